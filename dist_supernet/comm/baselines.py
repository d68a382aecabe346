"""The baselines a user would otherwise pick, behind the same interface and byte count.

- ``none``: DDP's fp32 all-reduce (torch's ``allreduce_hook``);
- ``fp16`` / ``bf16``: torch's compress hooks (bf16 needs NCCL);
- ``powersgd``: torch's PowerSGD hook (rank ``powersgd_rank``, error feedback,
  compression from the second iteration on: torch's default of 1000 vanilla
  iterations would make short comparisons measure fp32). On gloo each bucket
  finishes before the next starts (see ``_counting_powersgd_hook``).

Each is wrapped to add the bytes it put on the wire to a :class:`CommStats`.
"""

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from dist_supernet.comm.collectives import CollectiveError
from dist_supernet.comm.stats import CommStats, all_reduce_bytes
from dist_supernet.comm.topology import Topology

BASELINES = ("none", "fp16", "bf16", "powersgd")


def _named_failure(name: str, topology: Topology):
    """A future callback that re-raises a failed all-reduce (a peer stopped: timeout) naming stage and rank."""

    def check(future):
        try:
            return future.wait()  # done already inside a then() callback; blocks in the in-order PowerSGD path
        except Exception as error:
            raise CollectiveError(f"{name} collective failed in stage 'all-reduce gradient bucket' (world) on rank "
                                  f"{topology.rank} of {topology.world_size}: {error}") from error

    return check


def _counting_hook(stats: CommStats, topology: Topology, bytes_per_element: int, inner, name: str = "allreduce"):
    members = list(range(topology.world_size))

    def hook(process_group, bucket):
        stats.add(
            all_reduce_bytes(bucket.buffer().numel() * bytes_per_element, members, topology),
            exchanges=int(bucket.is_last()),
        )
        return inner(process_group, bucket).then(_named_failure(name, topology))

    return hook


def _counting_powersgd_hook(stats: CommStats, topology: Topology, *, in_order: bool):
    members = list(range(topology.world_size))

    def hook(state: powersgd.PowerSGDState, bucket) -> torch.futures.Future[torch.Tensor]:
        before = state.total_numel_after_compression
        future = powersgd.powerSGD_hook(state, bucket)
        # PowerSGD counts what it all-reduces (P, Q and the uncompressed tensors) once it
        # compresses; during its vanilla warm-up iteration nothing is counted: fp32 then.
        numel = state.total_numel_after_compression - before or bucket.buffer().numel()
        stats.add(all_reduce_bytes(numel * 4, members, topology), exchanges=int(bucket.is_last()))
        if not in_order:
            return future.then(_named_failure("powersgd", topology))
        # torch's hook issues its P and Q all-reduces from future callbacks, which on gloo
        # run on whichever thread completes a future: with several buckets two ranks can
        # issue them in different orders and the job crashes or hangs (seen by
        # benchmarks/slow_link.py on a 10M-parameter model). Finishing each bucket before
        # DDP hands over the next keeps one order; it gives up overlap for this baseline.
        done = torch.futures.Future()
        done.set_result(_named_failure("powersgd", topology)(future))
        return done

    return hook


def register_baseline_hook(
    ddp_model,
    name: str,
    *,
    powersgd_rank: int = 4,
    topology: Topology | None = None,
) -> CommStats:
    """Register baseline ``name`` on a DDP module; return the stats it adds to.

    Example::
        stats = register_baseline_hook(ddp_model, "powersgd", powersgd_rank=4)
        ...train...
        print(stats.snapshot()["bytes_total"])
    """
    if name not in BASELINES:
        raise ValueError(f"compression={name!r}: expected one of {', '.join(BASELINES + ('birder',))}")
    if name == "powersgd" and (not isinstance(powersgd_rank, int) or powersgd_rank < 1):
        raise ValueError(f"compression.rank={powersgd_rank!r}: must be an integer >= 1")
    topology = topology or Topology.from_env()
    stats = CommStats()
    if name == "powersgd":
        state = powersgd.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=2,  # the smallest torch allows with error feedback
            min_compression_rate=2,
        )
        in_order = dist.get_backend() == "gloo"
        ddp_model.register_comm_hook(state, _counting_powersgd_hook(stats, topology, in_order=in_order))
        return stats
    if name == "bf16" and dist.get_backend() != "nccl":
        raise ValueError("compression='bf16' needs the NCCL backend (torch's bf16 hook); use fp16 on gloo")
    inner, width = {
        "none": (default_hooks.allreduce_hook, 4),
        "fp16": (default_hooks.fp16_compress_hook, 2),
        "bf16": (default_hooks.bf16_compress_hook, 2),
    }[name]
    label = "allreduce" if name == "none" else name  # how an error names it: "allreduce collective failed ..."
    ddp_model.register_comm_hook(None, _counting_hook(stats, topology, width, inner, label))
    return stats


__all__ = ["BASELINES", "register_baseline_hook"]
