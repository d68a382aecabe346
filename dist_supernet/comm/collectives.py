"""1-bit collectives: every rank's packed ±1 bits in, the packed sum over ranks out.

Legend
    D  elements in the chunk (a DDP bucket), B = ceil(D / 8) packed bytes
    n  world size; L ranks per node; N nodes (n = L * N)
    C  elements in one rank's chunk (a multiple of 8), Cb = C / 8 bytes
    K  bit planes of an exact count, ceil(log2(rows + 1))

Every collective returns a :class:`Packed` result, the same on every rank:
either ``rows`` (uint8 [R, B'], the count of element j is the number of rows
with bit j set) or ``planes`` (uint8 [R, K, Cb], element j's exact count in K
bit planes of row j // C), and ``num_rows``, the denominator of the mean
ū = (2·count - num_rows) / num_rows. The optimizer decodes it straight into the
update (``kernels.apply_packed_``): ū never exists as a float tensor on the
hot path. :meth:`Packed.mean` decodes to floats for tests and tools.

They are called from one thread per rank in the same order on every rank (the
Birder hook's worker) and count their own wire bytes
(:mod:`dist_supernet.comm.stats`). Random stages draw from a counter-based hash
of the element's canonical index (an index map ``(seg_starts, seg_canon)``,
see ``kernels``), so the bits do not depend on DDP's bucket layout.

- ``allgather``: all-gather every rank's D bits; exact. ``auto`` picks it on one node up to 4 ranks.
- ``two_phase``: all-to-all of 1-bit chunks, each owner counts its chunk
  exactly, then all-gather of the chunk results: exact counts in K bit planes,
  or (``requantize``) one binary-randomised bit per element.
- ``hierarchical``: Birder's hierarchical 1-bit all-reduce. Exact count inside
  the node (all-to-all over the fast link), binary-randomised re-quantisation
  of the node average to 1 bit, then between the ranks with the same local
  rank on every node either (``inter_node="reduce_scatter"``) an all-to-all of
  1-bit sub-chunks, an exact count over the nodes per owner, one re-quantised
  bit and an all-gather of it — about 2·(N-1)/N bits per element per node
  across the node boundary at any N — or (``inter_node="allgather"``) an
  all-gather of every node's bit — (N-1) bits per element per node, exact
  over nodes, one round. ``auto`` picks ``allgather`` at N <= 2 (the same
  bytes, one round fewer, no second re-quantisation) and ``reduce_scatter``
  beyond. Last, an intra-node all-gather of the owners' results.

The registry: :data:`COLLECTIVES` maps each ``compression.collective`` name to
its class, which carries what the rest of the project needs: ``name`` (the
config value), ``needs_node_groups`` (whether the compressor creates the
intra- and inter-node process groups), its wire model (``_wire_bytes``, the
bytes it sends, counted on every exchange) and ``_reduce``. The config's
choices (:func:`collective_choices`), the compressor, the benchmarks and the
tests read it. A new collective is one file with a subclass of
:class:`OneBitCollective` decorated with :func:`register_collective`; a run
sees it once the module is imported, e.g. by the config's top-level
``plugins=[my_package.my_collective]`` key (see :mod:`dist_supernet.plugins`).
"""

import dataclasses

import torch
import torch.distributed as dist

from dist_supernet import kernels
from dist_supernet.comm.registry import add_entry
from dist_supernet.comm.seeding import mix_seed
from dist_supernet.comm.stats import WireBytes, all_gather_bytes, all_reduce_bytes, all_to_all_bytes
from dist_supernet.comm.topology import CommGroups, Topology

# torch 2.13 renamed all_gather_into_tensor; keep working on the older releases setup.py admits.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Seed streams of the random stages; the compress stage uses 0 (see optim.compressor).
STAGE_REQUANTIZE = 1
STAGE_REQUANTIZE_INTER = 2

INTER_NODE_FORMS = ("auto", "allgather", "reduce_scatter")


class CollectiveError(RuntimeError):
    """A collective stage failed (peer gone, timeout); names the stage and the rank."""


@dataclasses.dataclass
class Packed:
    """The packed result of a 1-bit collective (see the module docstring)."""

    payload: torch.Tensor  # uint8 [R, B'] (rows) or [R, K, Cb] (planes)
    planes: bool
    num_rows: int

    def counts(self, numel: int) -> torch.Tensor:
        """Exact counts of +1 as int32 [numel] (a decode for tests and tools, not the hot path)."""
        if self.planes:
            rows, num_planes, chunk_bytes = self.payload.shape
            counts = kernels.unpack_planes(self.payload, chunk_bytes * 8).reshape(-1)
            return counts[:numel]
        return kernels.unpack_counts(self.payload, numel)

    def mean(self, numel: int) -> torch.Tensor:
        """ū = (2·count - num_rows) / num_rows as float32 [numel]."""
        return kernels.counts_to_mean(self.counts(numel), self.num_rows)


def chunk_elems(numel: int, parts: int, multiple: int = 8) -> int:
    """Elements per chunk when splitting ``numel`` into ``parts`` chunks of a multiple of ``multiple`` (>= 8)."""
    per_part = -(-numel // parts)
    return max(multiple, -(-per_part // multiple) * multiple)


def whole_chunk_map(numel: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The index map of a chunk that is one parameter at canonical offset 0: (seg_starts, seg_canon)."""
    return (torch.tensor([0, numel], dtype=torch.int64, device=device),
            torch.zeros(1, dtype=torch.int64, device=device))


def _pad(tensor: torch.Tensor, size: int) -> torch.Tensor:
    if tensor.numel() == size:
        return tensor
    out = tensor.new_zeros(size)
    out[: tensor.numel()] = tensor
    return out


class OneBitCollective:
    """Base: the world-size-1 path, named stages, shared helpers.

    Subclasses set ``name``, ``needs_node_groups`` and implement ``_reduce`` and ``_wire_bytes``.
    """

    name = "base"
    needs_node_groups = False

    def __init__(self, topology: Topology, groups: CommGroups, *, requantize: bool = False,
                 inter_node: str = "auto"):
        self.topology = topology
        self.groups = groups
        self.requantize = requantize
        if inter_node not in INTER_NODE_FORMS:
            raise ValueError(f"inter_node={inter_node!r}: expected one of {', '.join(INTER_NODE_FORMS)}")
        self.inter_node = inter_node

    def reduce_packed(self, bits_B, numel, index_map, *, seed) -> Packed:
        """The packed sum of every rank's ±1 bits for a chunk of ``numel`` elements.

        ``index_map``: ``(seg_starts, seg_canon)`` of the chunk (canonical
        indices key the re-quantisation draws). ``seed`` must be the same on
        every rank and must not depend on the bucket layout (one per step).
        """
        if self.topology.world_size == 1 or numel == 0:
            return Packed(bits_B.view(1, -1), planes=False, num_rows=1)
        return self._reduce(bits_B, numel, index_map, seed)

    def reduce(self, bits_B, numel, index_map=None, *, seed, mask_D=None) -> torch.Tensor:
        """:meth:`reduce_packed` decoded to ū, float32 [numel] (0 where ``mask_D`` is False). For tests and tools."""
        if index_map is None:
            index_map = whole_chunk_map(numel, bits_B.device)
        mean = self.reduce_packed(bits_B, numel, index_map, seed=seed).mean(numel)
        if mask_D is not None:
            mean = mean.masked_fill_(~mask_D, 0.0)
        return mean

    def wire_bytes(self, numel: int) -> WireBytes:
        """Bytes this rank sends to reduce one chunk of ``numel`` elements."""
        if numel == 0 or self.topology.world_size == 1:
            return WireBytes()
        return self._wire_bytes(numel)

    # -- public stages (the hook's flag exchange uses them too) ---------------------------

    def stage(self, stage: str, where: str, fn):
        """Run ``fn()``; a failure (stopped peer, timeout) is re-raised naming the stage and this rank."""
        try:
            return fn()
        except Exception as error:  # re-raised with the stage named; the cause is chained
            raise CollectiveError(
                f"{self.name} collective failed in stage '{stage}' ({where}) on rank "
                f"{self.topology.rank} of {self.topology.world_size}: {error}"
            ) from error

    def all_reduce_max(self, stage: str, flags: torch.Tensor) -> WireBytes:
        """In-place MAX all-reduce of a small flag tensor over the world group; returns its wire bytes."""
        return all_reduce_max_over(stage, flags, self.groups.world, self.topology, name=self.name)

    def all_gather(self, stage, where, payload, num_rows, group):
        out = payload.new_empty(num_rows * payload.numel())
        self.stage(stage, where, lambda: _all_gather_flat(out, payload, group=group))
        return out

    def all_to_all(self, stage, where, payload, group):
        out = torch.empty_like(payload)
        self.stage(stage, where, lambda: dist.all_to_all_single(out, payload, group=group))
        return out

    def _reduce(self, bits_B, numel, index_map, seed) -> Packed:
        raise NotImplementedError

    def _wire_bytes(self, numel):
        raise NotImplementedError


def all_reduce_max_over(stage: str, flags: torch.Tensor, group, topology: Topology, *, name: str) -> WireBytes:
    """In-place MAX all-reduce of a small flag tensor over ``group`` (every rank of ``topology``); its wire bytes.

    A failure is re-raised naming ``name``, the stage and this rank (as :meth:`OneBitCollective.stage`).
    """
    if topology.world_size == 1:
        return WireBytes()
    try:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    except Exception as error:  # re-raised with the stage named; the cause is chained
        raise CollectiveError(f"{name} collective failed in stage '{stage}' (world) on rank {topology.rank} of "
                              f"{topology.world_size}: {error}") from error
    nbytes = flags.numel() * flags.element_size()
    return all_reduce_bytes(nbytes, list(range(topology.world_size)), topology)


COLLECTIVES: dict[str, type[OneBitCollective]] = {}
AUTO = "auto"  # a policy over the built-in collectives (resolve_collective), not a class


def register_collective(cls: type[OneBitCollective]) -> type[OneBitCollective]:
    """Class decorator: make ``cls`` the collective ``compression.collective=<cls.name>`` builds.

    Example::
        @register_collective
        class MyCollective(OneBitCollective):
            name = "mine"
            needs_node_groups = False
            def _reduce(self, bits_B, numel, index_map, seed): ...
            def _wire_bytes(self, numel): ...
    """
    add_entry(COLLECTIVES, cls, base=OneBitCollective, key="collective name", what="collective", reserved=(AUTO,))
    return cls


def collective_choices() -> tuple[str, ...]:
    """The values ``compression.collective`` accepts: ``auto`` and every registered collective."""
    return (AUTO, *COLLECTIVES)


@register_collective
class AllGather(OneBitCollective):
    """Every rank all-gathers every rank's bits; exact; receives (n - 1) * D bits."""

    name = "allgather"

    def _reduce(self, bits_B, numel, index_map, seed):
        n = self.topology.world_size
        rows = self.all_gather("all-gather bits", "world", bits_B, n, self.groups.world)
        return Packed(rows.view(n, -1), planes=False, num_rows=n)

    def _wire_bytes(self, numel):
        members = list(range(self.topology.world_size))
        return all_gather_bytes(kernels.num_bytes(numel), members, self.topology)


@register_collective
class TwoPhase(OneBitCollective):
    """Reduce-scatter of 1-bit chunks by all-to-all, exact count per owner, all-gather of results."""

    name = "two_phase"

    def _reduce(self, bits_B, numel, index_map, seed):
        n, rank = self.topology.world_size, self.topology.rank
        chunk = chunk_elems(numel, n)
        chunk_bytes = chunk // 8
        send = _pad(bits_B, n * chunk_bytes)
        recv = self.all_to_all("all-to-all chunks", "world", send, self.groups.world)
        counts_C = kernels.unpack_counts(recv.view(n, chunk_bytes), chunk)
        if self.requantize:
            mine = kernels.requantize(counts_C, n, *index_map, rank * chunk, seed=mix_seed(seed, STAGE_REQUANTIZE))
            rows = self.all_gather("all-gather requantized", "world", mine, n, self.groups.world)
            return Packed(rows.view(1, -1), planes=False, num_rows=1)
        planes = kernels.count_bits(n)
        mine = kernels.pack_counts(counts_C, planes).view(-1)
        rows = self.all_gather("all-gather counts", "world", mine, n, self.groups.world)
        return Packed(rows.view(n, planes, chunk_bytes), planes=True, num_rows=n)

    def _wire_bytes(self, numel):
        n = self.topology.world_size
        members = list(range(n))
        chunk_bytes = chunk_elems(numel, n) // 8
        phase2 = chunk_bytes if self.requantize else chunk_bytes * kernels.count_bits(n)
        return all_to_all_bytes(chunk_bytes, members, self.topology) + all_gather_bytes(
            phase2, members, self.topology
        )


@register_collective
class Hierarchical(OneBitCollective):
    """Exact inside a node, 1 bit between nodes (reduce-scatter or all-gather form), all-gather inside the node."""

    name = "hierarchical"
    needs_node_groups = True

    def form(self) -> str:
        """The inter-node form used: ``allgather`` or ``reduce_scatter`` (``auto`` resolved by the node count)."""
        if self.inter_node != "auto":
            return self.inter_node
        return "allgather" if self.topology.num_nodes <= 2 else "reduce_scatter"

    def _chunk(self, numel):
        topo = self.topology
        # reduce_scatter splits each rank's chunk again into N sub-chunks of whole bytes.
        multiple = 8 * topo.num_nodes if topo.num_nodes > 1 and self.form() == "reduce_scatter" else 8
        return chunk_elems(numel, topo.local_world_size, multiple)

    def _reduce(self, bits_B, numel, index_map, seed):
        topo = self.topology
        local, nodes = topo.local_world_size, topo.num_nodes
        chunk = self._chunk(numel)
        chunk_bytes = chunk // 8
        lo = topo.local_rank * chunk  # chunk-local position of this rank's chunk
        send = _pad(bits_B, local * chunk_bytes)
        if local > 1:
            recv = self.all_to_all("all-to-all chunks", "intra-node", send, self.groups.node)
            counts_C = kernels.unpack_counts(recv.view(local, chunk_bytes), chunk)
        if nodes == 1:  # one node: exact counts over its ranks, all-gathered inside it
            return self._gather_in_node(kernels.pack_counts(counts_C, kernels.count_bits(local)),
                                        planes=True, num_rows=local)
        if local > 1:
            # Nodes draw independently; the chunk owner's local rank does not enter.
            node_bits = kernels.requantize(counts_C, local, *index_map, lo,
                                           seed=mix_seed(seed, STAGE_REQUANTIZE, topo.node_rank))
        else:
            node_bits = send  # one rank per node: its bit is the node average, exactly
        if self.form() == "allgather":
            rows = self.all_gather("all-gather node bits", "inter-node", node_bits, nodes, self.groups.cross)
            if local == 1:
                return Packed(rows.view(nodes, chunk_bytes), planes=False, num_rows=nodes)
            counts_C = kernels.unpack_counts(rows.view(nodes, chunk_bytes), chunk)
            return self._gather_in_node(kernels.pack_counts(counts_C, kernels.count_bits(nodes)),
                                        planes=True, num_rows=nodes)
        sub = chunk // nodes
        recv = self.all_to_all("all-to-all node sub-chunks", "inter-node", node_bits, self.groups.cross)
        counts_S = kernels.unpack_counts(recv.view(nodes, sub // 8), sub)
        mine = kernels.requantize(counts_S, nodes, *index_map, lo + topo.node_rank * sub,
                                  seed=mix_seed(seed, STAGE_REQUANTIZE_INTER))
        chunk_bits = self.all_gather("all-gather node results", "inter-node", mine, nodes, self.groups.cross)
        return self._gather_in_node(chunk_bits.view(1, chunk_bytes), planes=False, num_rows=1)

    def _gather_in_node(self, mine, *, planes, num_rows):
        """All-gather each local owner's result ([K, Cb] planes or [1, Cb] bits) inside the node."""
        local = self.topology.local_world_size
        if local > 1:
            rows = self.all_gather("all-gather results", "intra-node", mine.reshape(-1), local, self.groups.node)
        else:
            rows = mine
        if planes:
            return Packed(rows.view(local, mine.shape[0], mine.shape[1]), planes=True, num_rows=num_rows)
        return Packed(rows.view(1, -1), planes=False, num_rows=num_rows)

    def _wire_bytes(self, numel):
        topo = self.topology
        local, nodes = topo.local_world_size, topo.num_nodes
        chunk_bytes = self._chunk(numel) // 8
        node = topo.node_members(topo.node_rank)
        cross = topo.cross_members(topo.local_rank)
        wire = WireBytes()
        if local > 1:
            wire += all_to_all_bytes(chunk_bytes, node, topo)
        if nodes > 1 and self.form() == "allgather":
            wire += all_gather_bytes(chunk_bytes, cross, topo)
            result_bytes = chunk_bytes * kernels.count_bits(nodes)
        elif nodes > 1:
            sub_bytes = chunk_bytes // nodes
            wire += all_to_all_bytes(sub_bytes, cross, topo) + all_gather_bytes(sub_bytes, cross, topo)
            result_bytes = chunk_bytes
        else:
            result_bytes = chunk_bytes * kernels.count_bits(local)
        if local > 1:
            wire += all_gather_bytes(result_bytes, node, topo)
        return wire


# ``auto``: ``hierarchical`` across nodes; on one node ``allgather`` up to 4 ranks, ``two_phase`` beyond
# (see resolve_collective).
ALLGATHER_MAX_RANKS = 4


def resolve_collective(name: str, topology: Topology) -> str:
    """The collective ``name`` stands for on ``topology``.

    ``auto``: ``hierarchical`` across nodes; on one node ``allgather`` up to 4 ranks (it sends
    (n - 1) bits per element in one round; ``two_phase`` sends (n - 1)/n·(1 + ceil(log2(n + 1)))
    in two: 1.5 vs 1 bit at n = 2, equal at 3 and 4, fewer from 5 on), ``two_phase`` beyond.
    DESIGN.md says two_phase on one node; this is the measured-bytes refinement of it.

    Example::
        >>> resolve_collective("auto", Topology(world_size=2, rank=0, local_world_size=2))
        'allgather'
    """
    if name == AUTO:
        if topology.num_nodes > 1:
            return Hierarchical.name
        return AllGather.name if topology.world_size <= ALLGATHER_MAX_RANKS else TwoPhase.name
    if name not in COLLECTIVES:
        raise ValueError(f"collective={name!r}: expected one of {', '.join(collective_choices())}")
    return name


def build_collective(name: str, topology: Topology, groups: CommGroups, *, requantize: bool = False,
                     inter_node: str = "auto"):
    """The 1-bit collective called ``name`` (``auto`` resolved); ValueError naming the value if unknown."""
    cls = COLLECTIVES[resolve_collective(name, topology)]
    return cls(topology, groups, requantize=requantize, inter_node=inter_node)


# Smallest per-peer message that keeps an all-to-all bandwidth bound: benchmarks/message_size.py measured
# the knee (half the 4 MiB throughput) at 256 KiB per peer for gloo between 2 processes on this project's
# 2-core machine (loaded: a ~0.5 ms per-call floor); below it, per-message latency dominates.
MIN_PEER_BYTES = 256 << 10
DDP_DEFAULT_BUCKET_MB = 25
MAX_BUCKET_MB = 1024


def bucket_cap_mb(world_size: int, min_peer_bytes: int = MIN_PEER_BYTES) -> int:
    """DDP ``bucket_cap_mb`` for Birder so each peer's 1-bit message stays >= ``min_peer_bytes``.

    A bucket of D fp32 gradients (4·D bytes) sends D / (8 n) bytes to each of n peers in
    ``two_phase``'s all-to-all and in ``hierarchical``'s inter-node reduce-scatter, so the
    cap is 32·n·min_peer_bytes, at least DDP's 25 MB and at most 1 GiB (fewer, larger buckets
    overlap less with backward; past 1 GiB, i.e. beyond 128 ranks at 256 KiB, the floor is not kept).

    Example::
        >>> bucket_cap_mb(2), bucket_cap_mb(16), bucket_cap_mb(64), bucket_cap_mb(512)
        (25, 128, 512, 1024)
    """
    cap = 32 * int(world_size) * int(min_peer_bytes) / 2**20
    return int(min(MAX_BUCKET_MB, max(DDP_DEFAULT_BUCKET_MB, -(-cap // 1))))
