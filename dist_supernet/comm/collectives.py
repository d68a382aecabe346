"""1-bit collectives: every rank's packed ±1 bits in, the average over ranks (ū) out.

Legend
    D  elements in the bucket, B = ceil(D / 8) packed bytes
    n  world size; L ranks per node; N nodes (n = L * N)
    C  elements in one rank's chunk (a multiple of 8), Cb = C / 8 bytes
    K  bit planes of an exact count, ceil(log2(rows + 1))

All three return identical ū on every rank and are called from one thread per
rank in the same order on every rank (the Birder hook's worker). They count
their own wire bytes (see :mod:`dist_supernet.comm.stats`).

- ``allgather``: all-gather every rank's D bits and average exactly.
- ``two_phase``: all-to-all of 1-bit chunks, each owner counts its chunk
  exactly, then all-gather of the chunk results: exact counts in K bit planes,
  or (``requantize``) one binary-randomised bit per element.
- ``hierarchical``: Birder's hierarchical 1-bit all-reduce. Exact count inside
  the node (all-to-all over the fast link), binary-randomised re-quantisation
  of the node average to 1 bit, all-gather of that bit between the ranks with
  the same local rank on every node (the only inter-node traffic, about
  (N - 1) * D / L bits per rank), then an intra-node all-gather of the exact
  inter-node counts.
"""

import torch
import torch.distributed as dist

import kernels
from dist_supernet.comm.seeding import mix_seed
from dist_supernet.comm.stats import WireBytes, all_gather_bytes, all_to_all_bytes
from dist_supernet.comm.topology import CommGroups, Topology

# torch 2.13 renamed all_gather_into_tensor; keep working on the older releases setup.py admits.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Seed streams of the random stages; the compress stage uses 0 (see optim.hook).
STAGE_REQUANTIZE = 1


class CollectiveError(RuntimeError):
    """A collective stage failed (peer gone, timeout); names the stage and the rank."""


def chunk_elems(numel: int, parts: int) -> int:
    """Elements per chunk when splitting ``numel`` into ``parts`` byte-aligned chunks."""
    per_part = -(-numel // parts)
    return max(8, -(-per_part // 8) * 8)


def _pad(tensor: torch.Tensor, size: int) -> torch.Tensor:
    if tensor.numel() == size:
        return tensor
    out = tensor.new_zeros(size)
    out[: tensor.numel()] = tensor
    return out


class OneBitCollective:
    """Base: the world-size-1 path, stage error wrapping, shared helpers."""

    name = "base"

    def __init__(self, topology: Topology, groups: CommGroups, *, requantize: bool = False):
        self.topology = topology
        self.groups = groups
        self.requantize = requantize

    def reduce(self, bits_B, numel, index_D, *, seed, mask_D=None) -> torch.Tensor:
        """Average of every rank's ±1 bits as float32 [numel] (0 where ``mask_D`` is False).

        ``seed`` keys the re-quantisation draws. It must be the same on every
        rank and must not depend on the bucket layout (pass one per step).
        """
        if numel == 0:
            return torch.zeros(0, dtype=torch.float32, device=bits_B.device)
        if self.topology.world_size == 1:
            mean = kernels.unpack_mean(bits_B.view(1, -1), numel)
        else:
            mean = self._reduce(bits_B, numel, index_D, seed)
        if mask_D is not None:
            mean = mean.masked_fill_(~mask_D, 0.0)
        return mean

    def wire_bytes(self, numel: int) -> WireBytes:
        """Bytes this rank sends to reduce one bucket of ``numel`` elements."""
        if numel == 0 or self.topology.world_size == 1:
            return WireBytes()
        return self._wire_bytes(numel)

    def _stage(self, stage: str, where: str, fn):
        try:
            return fn()
        except Exception as error:  # re-raised with the stage named; the cause is chained
            raise CollectiveError(
                f"{self.name} collective failed in stage '{stage}' ({where}) on rank "
                f"{self.topology.rank} of {self.topology.world_size}: {error}"
            ) from error

    def _all_gather(self, stage, where, payload, num_rows, group):
        out = payload.new_empty(num_rows * payload.numel())
        self._stage(stage, where, lambda: _all_gather_flat(out, payload, group=group))
        return out

    def _all_to_all(self, stage, where, payload, group):
        out = torch.empty_like(payload)
        self._stage(stage, where, lambda: dist.all_to_all_single(out, payload, group=group))
        return out

    def _reduce(self, bits_B, numel, index_D, seed):
        raise NotImplementedError

    def _wire_bytes(self, numel):
        raise NotImplementedError


class AllGather(OneBitCollective):
    """Every rank all-gathers every rank's bits; exact; receives (n - 1) * D bits."""

    name = "allgather"

    def _reduce(self, bits_B, numel, index_D, seed):
        n = self.topology.world_size
        rows = self._all_gather("all-gather bits", "world", bits_B, n, self.groups.world)
        return kernels.unpack_mean(rows.view(n, -1), numel)

    def _wire_bytes(self, numel):
        members = list(range(self.topology.world_size))
        return all_gather_bytes(kernels.num_bytes(numel), members, self.topology)


class TwoPhase(OneBitCollective):
    """Reduce-scatter of 1-bit chunks by all-to-all, exact count per owner, all-gather of results."""

    name = "two_phase"

    def _reduce(self, bits_B, numel, index_D, seed):
        n, rank = self.topology.world_size, self.topology.rank
        chunk = chunk_elems(numel, n)
        chunk_bytes = chunk // 8
        send = _pad(bits_B, n * chunk_bytes)
        recv = self._all_to_all("all-to-all chunks", "world", send, self.groups.world)
        counts_C = kernels.unpack_counts(recv.view(n, chunk_bytes), chunk)
        if self.requantize:
            index_C = _pad(index_D, n * chunk)[rank * chunk : (rank + 1) * chunk]
            mine = kernels.requantize(counts_C, n, index_C, seed=mix_seed(seed, STAGE_REQUANTIZE))
            rows = self._all_gather("all-gather requantized", "world", mine, n, self.groups.world)
            return kernels.unpack_mean(rows.view(1, -1), n * chunk)[:numel]
        planes = kernels.count_bits(n)
        mine = kernels.pack_counts(counts_C, planes).view(-1)
        rows = self._all_gather("all-gather counts", "world", mine, n, self.groups.world)
        counts = kernels.unpack_planes(rows.view(n, planes, chunk_bytes), chunk).view(-1)
        return kernels.counts_to_mean(counts[:numel], n)

    def _wire_bytes(self, numel):
        n = self.topology.world_size
        members = list(range(n))
        chunk_bytes = chunk_elems(numel, n) // 8
        phase2 = chunk_bytes if self.requantize else chunk_bytes * kernels.count_bits(n)
        return all_to_all_bytes(chunk_bytes, members, self.topology) + all_gather_bytes(
            phase2, members, self.topology
        )


class Hierarchical(OneBitCollective):
    """Exact inside a node, 1 bit between nodes, exact counts all-gathered inside the node."""

    name = "hierarchical"

    def _reduce(self, bits_B, numel, index_D, seed):
        topo = self.topology
        local, nodes = topo.local_world_size, topo.num_nodes
        chunk = chunk_elems(numel, local)
        chunk_bytes = chunk // 8
        send = _pad(bits_B, local * chunk_bytes)
        if local > 1:
            recv = self._all_to_all("all-to-all chunks", "intra-node", send, self.groups.node)
            counts_C = kernels.unpack_counts(recv.view(local, chunk_bytes), chunk)
        else:
            counts_C = kernels.unpack_counts(send.view(1, chunk_bytes), chunk)
        rows_counted = local
        if nodes > 1:
            if local > 1:
                lo = topo.local_rank * chunk
                index_C = _pad(index_D, local * chunk)[lo : lo + chunk]
                # Nodes draw independently; the chunk owner's local rank does not enter.
                node_bits = kernels.requantize(
                    counts_C, local, index_C, seed=mix_seed(seed, STAGE_REQUANTIZE, topo.node_rank)
                )
            else:
                node_bits = send  # one rank per node: its bit is the node average, exactly
            rows = self._all_gather("all-gather node bits", "inter-node", node_bits, nodes, self.groups.cross)
            counts_C = kernels.unpack_counts(rows.view(nodes, chunk_bytes), chunk)
            rows_counted = nodes
        if local > 1:
            planes = kernels.count_bits(rows_counted)
            mine = kernels.pack_counts(counts_C, planes).view(-1)
            rows = self._all_gather("all-gather counts", "intra-node", mine, local, self.groups.node)
            counts_C = kernels.unpack_planes(rows.view(local, planes, chunk_bytes), chunk).view(-1)
        return kernels.counts_to_mean(counts_C[:numel], rows_counted)

    def _wire_bytes(self, numel):
        topo = self.topology
        local, nodes = topo.local_world_size, topo.num_nodes
        chunk_bytes = chunk_elems(numel, local) // 8
        node = topo.node_members(topo.node_rank)
        wire = WireBytes()
        if local > 1:
            wire += all_to_all_bytes(chunk_bytes, node, topo)
        if nodes > 1:
            wire += all_gather_bytes(chunk_bytes, topo.cross_members(topo.local_rank), topo)
        if local > 1:
            rows_counted = nodes if nodes > 1 else local
            wire += all_gather_bytes(chunk_bytes * kernels.count_bits(rows_counted), node, topo)
        return wire


COLLECTIVES = {cls.name: cls for cls in (AllGather, TwoPhase, Hierarchical)}


def build_collective(name: str, topology: Topology, groups: CommGroups, *, requantize: bool = False):
    """The 1-bit collective called ``name``; ValueError naming the value if unknown."""
    if name not in COLLECTIVES:
        raise ValueError(f"collective={name!r}: expected one of {', '.join(COLLECTIVES)}")
    return COLLECTIVES[name](topology, groups, requantize=requantize)
