"""Replicas checked while training: one checksum per parameter, compared across ranks in one all-reduce.

Data parallelism is only correct while every rank holds bit-identical parameters.
Nothing in a step would notice if they drifted apart (a resume that loaded
per-rank state into a rank-independent optimizer, a non-deterministic kernel,
a bit flip): each rank trains on, and the run's end reports two models as one.
:class:`ReplicaCheck` compares them every ``trainer.sync_check_every`` steps and
before every checkpoint, so that no checkpoint holds diverged replicas, and
stops the job with one line naming the step and the first differing parameter.

The checksum of a parameter is the sum of its elements' bits read as integers
(int32 for fp32, int16 for fp16/bf16, int64 for fp64), accumulated in int64
(wrapping mod 2**64). Integer addition is exact and order-independent, so equal
parameters give equal sums on any device and with any reduction order, and a
change of any one element (one ulp included) changes the sum. Two changes whose
bit differences cancel exactly are missed; the run's end compares full sha256
digests (``Trainer._finish``) and fails then. The ranks compare by one
all-reduce (MAX) of ``[c, -c]`` (2 int64 per parameter): a parameter differs
where ``max(c) != min(c)``. Its cost, measured against the step time:
``benchmarks/sync_check_cost.py`` (docs/reliability.md, "Replicas").

Example::
    check = ReplicaCheck(model, every=50, device=device)   # on every rank, after the process group
    ...
    if check.due(step) or saving:
        check.check(step)      # ReplicaDivergenceError on every rank when the ranks differ
"""

import time

import torch
import torch.distributed as dist

# Parameter dtype's element size (bytes) -> the integer dtype its bits are summed as.
_BITS_AS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ReplicaDivergenceError(RuntimeError):
    """The ranks' parameters differ; raised on every rank, with the same one-line message."""


def param_checksums(params: list[torch.Tensor]) -> torch.Tensor:
    """int64 [P]: the wrapped sum of each parameter's bits read as integers (see the module docstring).

    >>> p = torch.tensor([1.0, 2.0])
    >>> int(param_checksums([p])[0]) == int(p.view(torch.int32).sum(dtype=torch.int64))
    True
    """
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    sums = []
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor (FSDP2): this rank's shard
        flat = local.detach().reshape(-1)
        as_int = _BITS_AS.get(flat.element_size())
        bits = flat.view(as_int) if as_int is not None else flat.view(torch.uint8)
        sums.append(bits.sum(dtype=torch.int64))
    return torch.stack(sums)


class ReplicaCheck:
    """Compares this rank's parameters with every other rank's; see the module docstring.

    Args:
        module: the model (its ``named_parameters`` name the differing parameter).
        every: steps between checks; 0 = only when :meth:`check` is called (before checkpoints).
        device: where the all-reduce runs (the process group's device).
        group: the process group of the ranks that hold replicas (default: the world); with FSDP2 (HSDP)
            the ranks holding the same shards, one per node, whose local shards are compared.
    """

    def __init__(self, module: torch.nn.Module, *, every: int, device: torch.device, group=None):
        named = list(module.named_parameters())
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.every = every
        self.device = device
        self.group = group
        self.last_equal_step: int | None = None
        self.num_checks = 0
        self.seconds = 0.0  # wall time spent in check(), the all-reduce's wait for the slowest rank included

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def check(self, step: int, *, when: str = "") -> None:
        """Collective: raises :class:`ReplicaDivergenceError` on every rank if any parameter differs."""
        started = time.perf_counter()
        sums = param_checksums(self.params).to(self.device)
        both = torch.cat([sums, -sums])
        if dist.get_world_size(self.group) > 1:
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        high, neg_low = both.cpu().split(len(sums))
        differ = (high != -neg_low).nonzero().flatten().tolist()
        self.num_checks += 1
        self.seconds += time.perf_counter() - started
        if not differ:
            self.last_equal_step = step
            return
        first = differ[0]
        # Which ranks hold which value of the first differing parameter (a failure path: one more collective).
        values = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(values, int(sums[first]), group=self.group)
        groups: dict[int, list[int]] = {}
        for rank, value in enumerate(values):
            groups.setdefault(value, []).append(rank)
        ranks = " vs ".join("rank" + ("s " if len(g) > 1 else " ") + ",".join(map(str, g)) for g in groups.values())
        since = (f"equal at step {self.last_equal_step}, the previous check" if self.last_equal_step is not None
                 else "not checked before in this process")
        raise ReplicaDivergenceError(
            f"step {step}{when}: the replicas differ: first differing parameter {self.names[first]} ({ranks}; "
            f"{len(differ)} of {len(sums)} parameters differ; {since}); stopping before another checkpoint is written")
