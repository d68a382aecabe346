"""A test-only plugin: one toy 1-bit collective and one toy baseline, each one class plus one registration line.

Loaded the way a user loads theirs: ``plugins=[tests.toy_plugin]`` in the training app
(every torchrun worker and the sweep's pre-check import it), ``--plugins tests.toy_plugin``
in the benchmarks. tests/unit/test_registries.py and tests/distributed/test_registries.py use it.

- ``toy_count_allreduce``: every rank's bits as int32 0/1 counts, summed by one all-reduce;
  exact, 32 bits per element on the wire (a deliberately wasteful, obviously correct collective).
- ``toy_chunked``: DDP's fp32 all-reduce of each bucket in ``num_chunks`` pieces, one
  all-reduce call each; its own config key ``compression.num_chunks`` (an int in [1, 64]).
"""

import dataclasses

import torch
import torch.distributed as dist

from dist_supernet import kernels
from dist_supernet.comm import Baseline, BaselineConfig, OneBitCollective, register_baseline, register_collective
from dist_supernet.comm.collectives import Packed
from dist_supernet.comm.stats import all_reduce_bytes
from dist_supernet.schema import bounded

TOY_COLLECTIVE = "toy_count_allreduce"
TOY_BASELINE = "toy_chunked"


@register_collective
class ToyCountAllReduce(OneBitCollective):
    """Exact counts by one int32 all-reduce over the world group: Packed planes of one row."""

    name = TOY_COLLECTIVE
    needs_node_groups = False

    def _reduce(self, bits_B, numel, index_map, seed):
        counts_D = kernels.unpack_counts(bits_B.view(1, -1), numel).to(torch.int32)
        self.stage("all-reduce counts", "world", lambda: dist.all_reduce(counts_D, group=self.groups.world))
        n = self.topology.world_size
        planes = kernels.pack_counts(counts_D, kernels.count_bits(n))  # uint8 [K, ceil(D / 8)]
        return Packed(planes.unsqueeze(0), planes=True, num_rows=n)

    def _wire_bytes(self, numel):
        return all_reduce_bytes(4 * numel, list(range(self.topology.world_size)), self.topology)


@dataclasses.dataclass
class ToyChunkedConfig(BaselineConfig):
    name: str = TOY_BASELINE
    num_chunks: int = bounded(2, min=1, max=64)  # all-reduce calls per bucket


@register_baseline
class ToyChunked(Baseline):
    """fp32 mean of each bucket by ``num_chunks`` blocking all-reduces (counted like DDP's own)."""

    name = TOY_BASELINE
    config = ToyChunkedConfig

    @classmethod
    def register_hook(cls, ddp_model, cfg, *, stats, topology):
        members = list(range(topology.world_size))

        def hook(process_group, bucket):
            buffer = bucket.buffer()
            buffer.div_(topology.world_size)
            for part in buffer.tensor_split(cfg.num_chunks):
                dist.all_reduce(part, group=process_group)
            stats.add(all_reduce_bytes(buffer.numel() * 4, members, topology), exchanges=int(bucket.is_last()))
            done = torch.futures.Future()
            done.set_result(buffer)
            return done

        ddp_model.register_comm_hook(ddp_model.process_group, hook)  # the DDP module's group (a node under sync)
