"""Birder's DDP communication hook: one fused compress, one 1-bit collective, one decode per bucket.

Legend: D elements in a bucket, P parameters in a bucket, T elements in the model.

The hook follows torch's ``ddp_comm_hooks`` convention: a stateful function
``birder_hook(state, bucket) -> Future[Tensor]`` whose result (ū, the average
of every rank's ±1) DDP writes into the gradients; :class:`~dist_supernet.optim.Birder`
then applies ``x -= lr * (ū + wd * x)``.

Why a worker thread: the 1-bit collectives have two or three stages with local
work between them. The hook hands each bucket to one communication thread per
rank and returns at once, so backward keeps computing while buckets are
compressed and exchanged (DDP's overlap), and the stages of all buckets are
issued from one thread in the order DDP calls the hook, which is the same on
every rank. The thread uses its own process groups (see ``CommGroups``).
"""

import queue
import threading

import torch
import torch.distributed as dist

import kernels
from dist_supernet.comm import (
    CommGroups,
    CommStats,
    Topology,
    WireBytes,
    build_collective,
    mix_seed,
)
from dist_supernet.comm.stats import all_reduce_bytes

STAGE_COMPRESS = 0
# Rank stand-in for the seed when every rank must draw the same bits (Birder
# applied to an already averaged gradient, no 1-bit exchange).
SHARED_DRAW_RANK = -1


class _BucketLayout:
    """Flat m, b and canonical indices for one bucket's parameters, in bucket order."""

    def __init__(self, params, offsets, device):
        self.params = tuple(params)
        self.numels = [p.numel() for p in params]
        self.numel = sum(self.numels)
        self.index = torch.cat(
            [
                torch.arange(offsets[p], offsets[p] + n, dtype=torch.int32, device=device)
                for p, n in zip(params, self.numels)
            ]
        ) if params else torch.zeros(0, dtype=torch.int32, device=device)
        self.numels_t = torch.tensor(self.numels, dtype=torch.long, device=device)
        self.m = None
        self.b = None
        self.backup = None


class _CommWorker:
    """One daemon thread running submitted jobs in order; results go to torch futures."""

    def __init__(self):
        self._jobs = queue.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()

    def submit(self, job, future):
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="birder-comm", daemon=True)
                self._thread.start()
        self._jobs.put((job, future))

    def _run(self):
        while True:
            job, future = self._jobs.get()
            try:
                result = job()
            except BaseException as error:  # handed to DDP, which raises it in backward
                future.set_exception(error)
            else:
                future.set_result(result)


class BirderState:
    """State of the Birder comm hook.

    Hyperparameters: ``beta`` (EMA factor of m and b), ``amsgrad`` (b = max(b_prev, b)),
    ``seed`` (base of every random draw), the 1-bit ``collective``.
    Per-parameter state: ``param_state[p] = {"m", "b"}`` fp32, shared with the
    optimizer's ``state``; views into one flat buffer per DDP bucket so the
    hook reads them without a per-parameter loop. Keyed by parameter, not by
    bucket index, so DDP's bucket rebuild after the first iteration re-lays
    them out instead of losing or misaligning them.
    Stats: ``stats`` (bytes on the wire, exchanges).

    Example::
        ddp_model = DistributedDataParallel(model)
        state = BirderState.for_ddp(ddp_model, collective="two_phase")
        ddp_model.register_comm_hook(state, birder_hook)
    """

    def __init__(
        self,
        params,
        *,
        beta: float = 0.9,
        amsgrad: bool = False,
        seed: int = 0,
        collective: str | None = "two_phase",
        requantize: bool = False,
        num_nodes: int | None = None,
        track_unused: bool = False,
        skip_nonfinite: bool = True,
        timeout_s: float | None = None,
    ):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta!r}: must be in [0, 1)")
        # hyperparameters
        self.beta = float(beta)
        self.amsgrad = bool(amsgrad)
        self.seed = int(seed)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.topology = Topology.from_env(num_nodes)
        if collective is None:
            self.collective = None
            self.draw_rank = SHARED_DRAW_RANK
        else:
            groups = CommGroups.create(
                self.topology, hierarchical=collective == "hierarchical", timeout_s=timeout_s
            )
            self.groups = groups
            self.collective = build_collective(collective, self.topology, groups, requantize=requantize)
            self.draw_rank = self.topology.rank
        # per-parameter state
        self.params = list(params)
        self.position = {p: i for i, p in enumerate(self.params)}
        self.offset = {}
        total = 0
        for p in self.params:
            self.offset[p] = total
            total += p.numel()
        self.numel_total = total
        if total >= 2**31:
            raise ValueError(f"{total} parameters: the canonical index is int32, at most 2**31 - 1")
        self.param_state = {
            p: {
                "m": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format),
                "b": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format),
            }
            for p in self.params
        }
        self.step = 0
        self._layouts = {}
        self.canonical_mask = None  # bool [T] for the coming step, or None
        self.track_unused = bool(track_unused)
        self.used_local = None
        self.used_global = None
        if self.track_unused:
            device = self.params[0].device if self.params else torch.device("cpu")
            self.used_local = torch.zeros(len(self.params), dtype=torch.uint8, device=device)
            self.used_global = torch.ones(len(self.params), dtype=torch.uint8, device=device)
            for p in self.params:
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._mark_used)
        # Non-finite gradients: per-parameter flags of this step, and the buckets whose
        # m, b were updated this step (restored from their snapshot if any rank saw NaN/Inf).
        self.nonfinite_local = torch.zeros(len(self.params), dtype=torch.uint8,
                                           device=self.params[0].device if self.params else "cpu")
        self._touched = []
        self._worker = _CommWorker()
        # stats
        self.stats = CommStats()

    @classmethod
    def for_ddp(cls, ddp_model, **kwargs) -> "BirderState":
        """A state over ``ddp_model``'s parameters; tracks unused ones when DDP may have some.

        With ``find_unused_parameters`` or ``static_graph`` a parameter may get no
        gradient; the hook then OR-reduces per-parameter "got a gradient" flags
        across ranks (one small all-reduce per bucket) so that every rank skips
        the same parameters.
        """
        may_skip = getattr(ddp_model, "find_unused_parameters", False) or getattr(ddp_model, "static_graph", False)
        kwargs.setdefault("track_unused", bool(may_skip))
        return cls(list(ddp_model.module.parameters()), **kwargs)

    # -- per-step inputs -------------------------------------------------------------

    def _mark_used(self, param):
        self.used_local[self.position[param]] = 1

    def set_grad_mask(self, masks) -> None:
        """Elements that may move in the coming step (True) — the rest keep x, m and b.

        ``masks``: None (every element that got a gradient), a bool tensor over
        all parameters in canonical order, or a dict ``{param: bool tensor}``
        (parameters left out are fully active). Must be identical on every
        rank: derive it from the sampled architectures, never from a local
        ``grad == 0``.
        """
        if masks is None or isinstance(masks, torch.Tensor):
            self.canonical_mask = masks
            return
        device = self.params[0].device
        flat = torch.ones(self.numel_total, dtype=torch.bool, device=device)
        for p, mask in masks.items():
            if p not in self.offset:
                raise ValueError("set_grad_mask: a masked parameter is not managed by this Birder state")
            start = self.offset[p]
            flat[start : start + p.numel()] = mask.reshape(-1).to(device=device, dtype=torch.bool)
        self.canonical_mask = flat

    def param_mask(self, param):
        """For the optimizer: None (all elements move), False (none), or a bool mask like ``param``."""
        if self.used_global is not None and not bool(self.used_global[self.position[param]]):
            return False
        if self.canonical_mask is None:
            return None
        start = self.offset[param]
        return self.canonical_mask[start : start + param.numel()].view_as(param)

    def nonfinite_params(self) -> list[int]:
        """Positions of the parameters that had NaN/Inf gradient on ANY rank this step.

        A collective on the hook's group (call on every rank, after backward).
        """
        flags = self.nonfinite_local
        if self.collective is not None and self.topology.world_size > 1:
            flags = flags.clone()
            self.collective._stage(  # a stopped peer fails here too: name the stage, not just gloo's error
                "all-reduce non-finite flags",
                "world",
                lambda: dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.groups.world),
            )
        return torch.nonzero(flags).flatten().tolist()

    def restore_touched(self) -> None:
        """Undo this step's m, b updates (every bucket exchanged since the last step)."""
        for layout in self._touched:
            layout.m.copy_(layout.backup[0])
            layout.b.copy_(layout.backup[1])

    def end_step(self) -> None:
        """Called by the optimizer after applying (or skipping) a step."""
        self.step += 1
        self.canonical_mask = None
        self._touched = []
        self.nonfinite_local.zero_()
        if self.used_local is not None:
            self.used_local.zero_()
            self.used_global.fill_(1)

    def invalidate_layouts(self) -> None:
        """Forget the flat buffers (after the optimizer loaded new per-parameter m, b)."""
        self._layouts.clear()

    def step_seed(self, stage: int = STAGE_COMPRESS) -> int:
        return mix_seed(self.seed, self.draw_rank, self.step, stage)

    # -- bucket layout -----------------------------------------------------------------

    def layout_for(self, params) -> _BucketLayout:
        key = tuple(id(p) for p in params)
        layout = self._layouts.get(key)
        if layout is not None:
            return layout
        for p in params:
            if p not in self.offset:
                raise ValueError("a DDP bucket holds a parameter that this Birder state does not manage")
        device = params[0].device if params else torch.device("cpu")
        layout = _BucketLayout(params, self.offset, device)
        layout.positions = torch.tensor([self.position[p] for p in params], dtype=torch.long, device=device)
        # Move each parameter's m, b into the bucket's flat buffers and point the
        # shared per-parameter state at views of them.
        layout.m = torch.cat([self.param_state[p]["m"].reshape(-1) for p in params]) if params else None
        layout.b = torch.cat([self.param_state[p]["b"].reshape(-1) for p in params]) if params else None
        start = 0
        for p, n in zip(params, layout.numels):
            self.param_state[p]["m"] = layout.m[start : start + n].view_as(p)
            self.param_state[p]["b"] = layout.b[start : start + n].view_as(p)
            start += n
        # Layouts that share a parameter with this one are stale (DDP rebuilt its buckets).
        members = set(key)
        for other_key in [k for k in self._layouts if members.intersection(k)]:
            del self._layouts[other_key]
        self._layouts[key] = layout
        return layout

    # -- the exchange ------------------------------------------------------------------

    def exchange(self, grad_D: torch.Tensor, layout: _BucketLayout, *, is_last: bool) -> torch.Tensor:
        """Compress this rank's gradient, reduce 1 bit per element, return ū (float32 [D])."""
        mask_D = None
        if self.canonical_mask is not None:
            mask_D = self.canonical_mask[layout.index]
        wire = WireBytes()
        if self.used_local is not None:
            positions = layout.positions
            used = self.used_local[positions].clone()
            if self.topology.world_size > 1:
                self.collective._stage(
                    "all-reduce used-parameter flags",
                    "world",
                    lambda: dist.all_reduce(used, op=dist.ReduceOp.MAX, group=self.groups.world),
                )
                wire += all_reduce_bytes(used.numel(), list(range(self.topology.world_size)), self.topology)
            self.used_global[positions] = used
            if not bool(used.all()):
                used_D = torch.repeat_interleave(used.bool(), layout.numels_t)
                mask_D = used_D if mask_D is None else mask_D & used_D
        if self.skip_nonfinite:
            # A snapshot to restore if any rank's gradient turns out non-finite in this
            # step (possibly in a later bucket): with overlap, this bucket's m, b are
            # updated before that is known. Costs one copy pass and 8 bytes per element.
            if layout.backup is None:
                layout.backup = torch.empty(2, layout.numel, dtype=torch.float32, device=layout.m.device)
            layout.backup[0].copy_(layout.m)
            layout.backup[1].copy_(layout.b)
            self._touched.append(layout)
            if not bool(torch.isfinite(grad_D).all()):
                start = 0
                for p, n in zip(layout.params, layout.numels):
                    if not bool(torch.isfinite(grad_D[start : start + n]).all()):
                        self.nonfinite_local[self.position[p]] = 1
                    start += n
        bits_B = kernels.compress(
            grad_D, layout.m, layout.b, layout.index,
            beta=self.beta, seed=self.step_seed(STAGE_COMPRESS), mask=mask_D, amsgrad=self.amsgrad,
        )
        # The collective's own draws are keyed by the step, not by this rank: which rank
        # owns an element's chunk depends on DDP's bucket layout, which a resume changes.
        mean_D = self.collective.reduce(
            bits_B, layout.numel, layout.index, seed=mix_seed(self.seed, self.step), mask_D=mask_D
        )
        self.stats.add(wire + self.collective.wire_bytes(layout.numel), exchanges=int(is_last))
        return mean_D


def birder_hook(state: BirderState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: 1 bit per gradient element on the wire; the future holds ū.

    Example::
        ddp_model.register_comm_hook(BirderState.for_ddp(ddp_model), birder_hook)
    """
    grad_D = bucket.buffer()
    layout = state.layout_for(bucket.parameters())
    if layout.numel != grad_D.numel():
        raise RuntimeError(f"bucket {bucket.index()} holds {grad_D.numel()} elements, its parameters {layout.numel}")
    is_last = bucket.is_last()
    if grad_D.is_cuda:
        future = torch.futures.Future(devices=[grad_D.device])
        ready = torch.cuda.Event()
        ready.record()

        def job():
            with torch.cuda.device(grad_D.device):
                torch.cuda.current_stream().wait_event(ready)
                return state.exchange(grad_D, layout, is_last=is_last).to(grad_D.dtype)

    else:
        future = torch.futures.Future()

        def job():
            return state.exchange(grad_D, layout, is_last=is_last).to(grad_D.dtype)

    state._worker.submit(job, future)
    return future

