"""The exchange between worker groups: every node's flat vector in, their mean out, the same on every node.

Legend: D elements, N nodes (worker groups) in the exchange, C elements of one node's chunk
(a reduce-scatter), P payload bytes.

Runs over the *cross* group (the ranks with this local rank, one per node; see
:class:`dist_supernet.sync.diloco.SyncGroups`), from the synchronisation's worker thread. Its
byte counts use a topology in which every member is its own node, so everything it sends
is inter-node.

Two forms, as the 1-bit collectives of :mod:`dist_supernet.comm` have:

- ``allgather``: every node all-gathers every node's payload and decodes their mean: (N - 1) P
  bytes sent per node, one round, each quantizer's error once.
- ``reduce_scatter``: the vector is cut into N chunks of whole quantizer blocks; an all-to-all
  sends chunk c of every node to node c, which decodes their mean, encodes it again (a fresh
  seed) and all-gathers it: 2 (N - 1) / N P bytes per node at any N, a second quantization
  error (none for fp32, where this is a ring all-reduce's traffic).

``auto`` takes ``allgather`` up to 2 nodes (the same bytes, one round fewer) and
``reduce_scatter`` beyond.
"""

import torch
import torch.distributed as dist

from dist_supernet.comm import CommStats, Topology, WireBytes, chunk_elems, mix_seed
from dist_supernet.comm.collectives import CollectiveError
from dist_supernet.comm.stats import all_gather_bytes, all_to_all_bytes
from dist_supernet.sync.quantizers import Quantizer

_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

STAGE_CHUNK = 1  # seed stream of a node's chunk encodings (reduce_scatter phase 1)
STAGE_OWNER = 2  # seed stream of an owner's re-encoding (reduce_scatter phase 2)
STAGE_NODE = 3  # a node's own stream, where the quantizer's decoder needs no seed


def resolve_form(form: str, num_nodes: int) -> str:
    """``auto``: allgather up to 2 nodes, reduce_scatter beyond.

    Example::
        >>> resolve_form("auto", 2), resolve_form("auto", 4), resolve_form("allgather", 4)
        ('allgather', 'reduce_scatter', 'allgather')
    """
    if form == "auto":
        return "allgather" if num_nodes <= 2 else "reduce_scatter"
    if form not in ("allgather", "reduce_scatter"):
        raise ValueError(f"form={form!r}: expected one of auto, allgather, reduce_scatter")
    return form


def node_topology(num_nodes: int, node_rank: int) -> Topology:
    """The cross group as a topology of single-rank nodes: its byte counts are all inter-node."""
    return Topology(world_size=num_nodes, rank=node_rank, local_world_size=1)


class MeanExchange:
    """The mean over the nodes of one float32 vector each, through ``quantizer``'s payloads.

    ``group``: the process group of the N nodes' ranks (None with one node: the mean is the
    vector itself, nothing is sent). ``seed`` of :meth:`mean` must be the same on every node.
    ``stats``: where :meth:`mean` adds the bytes it sends (None: the caller counts, with
    :meth:`wire_bytes`, e.g. on another thread than the exchange's).

    Example::
        exchange = MeanExchange(OneBit(), groups.cross, num_nodes=2, node_rank=topo.node_rank)
        mean = exchange.mean(delta, seed=mix_seed(base, fragment, step))   # on every node
    """

    def __init__(self, quantizer: Quantizer, group, *, num_nodes: int, node_rank: int, form: str = "auto",
                 stats: CommStats | None = None):
        self.quantizer = quantizer
        self.group = group
        self.topology = node_topology(num_nodes, node_rank)
        self.form = resolve_form(form, num_nodes)
        self.stats = stats

    @property
    def num_nodes(self) -> int:
        return self.topology.world_size

    def _encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if not self.quantizer.shared_seed:  # independent rounding per node
            seed = mix_seed(seed, STAGE_NODE, self.topology.rank)
        return self.quantizer.encode(x, seed)

    def _stage(self, stage: str, fn):
        try:
            return fn()
        except Exception as error:  # a stopped peer or a timeout: named, the cause chained
            raise CollectiveError(f"sync exchange failed in stage '{stage}' (inter-node) on node "
                                  f"{self.topology.rank} of {self.num_nodes}: {error}") from error

    def mean(self, x_D: torch.Tensor, seed: int) -> torch.Tensor:
        """The nodes' mean of ``x_D`` (float32 [D]); adds the bytes sent to ``stats`` when given."""
        x_D = x_D.detach().reshape(-1).to(torch.float32)
        numel = x_D.numel()
        if self.num_nodes == 1 or numel == 0:
            return x_D.clone()
        if self.form == "allgather":
            out = self._allgather(x_D, seed)
        else:
            out = self._reduce_scatter(x_D, seed)
        if self.stats is not None:
            self.stats.add(self.wire_bytes(numel))
        return out

    def _allgather(self, x_D, seed):
        payload = self._encode(x_D, seed)
        rows = payload.new_empty(self.num_nodes * payload.numel())
        self._stage("all-gather payloads", lambda: _all_gather_flat(rows, payload, group=self.group))
        return self.quantizer.decode_mean(rows.view(self.num_nodes, -1), x_D.numel(), seed)

    def _chunk(self, numel: int) -> int:
        return chunk_elems(numel, self.num_nodes, max(8, self.quantizer.granule))

    def _reduce_scatter(self, x_D, seed):
        nodes, me, numel = self.num_nodes, self.topology.rank, x_D.numel()
        chunk = self._chunk(numel)
        padded = x_D.new_zeros(nodes * chunk)
        padded[:numel] = x_D
        send = torch.stack([self._encode(padded[c * chunk:(c + 1) * chunk], mix_seed(seed, STAGE_CHUNK, c))
                            for c in range(nodes)])
        recv = torch.empty_like(send)
        self._stage("all-to-all chunk payloads", lambda: dist.all_to_all_single(recv, send, group=self.group))
        mine = self.quantizer.decode_mean(recv, chunk, mix_seed(seed, STAGE_CHUNK, me))
        # The owner's mean crosses the link once more, as a fresh encoding (its own seed: unbiased again).
        result = self._encode(mine, mix_seed(seed, STAGE_OWNER, me))
        rows = result.new_empty(nodes * result.numel())
        self._stage("all-gather owner results", lambda: _all_gather_flat(rows, result, group=self.group))
        rows = rows.view(nodes, -1)
        parts = [self.quantizer.decode_mean(rows[c:c + 1], chunk, mix_seed(seed, STAGE_OWNER, c)) for c in range(nodes)]
        return torch.cat(parts)[:numel]

    def wire_bytes(self, numel: int) -> WireBytes:
        """Bytes this node sends to average one vector of ``numel`` elements."""
        if self.num_nodes == 1 or numel == 0:
            return WireBytes()
        members = list(range(self.num_nodes))
        if self.form == "allgather":
            return all_gather_bytes(self.quantizer.payload_bytes(numel), members, self.topology)
        chunk_bytes = self.quantizer.payload_bytes(self._chunk(numel))
        return (all_to_all_bytes(chunk_bytes, members, self.topology)
                + all_gather_bytes(chunk_bytes, members, self.topology))
