"""Birder's DDP communication hook: the DDP adapter of the exchange engine.

Legend: D elements in a bucket, P parameters in a bucket, T elements in the model.

The hook follows torch's ``ddp_comm_hooks`` convention: a stateful function
``birder_hook(state, bucket) -> Future[Tensor]``. It maps DDP's bucket to a
chunk of canonical elements (the bucket's parameters, in DDP's memory order)
and submits it to the :class:`~dist_supernet.optim.engine.ExchangeEngine`,
which compresses it (m, b, one random bit per element), runs the 1-bit
collective and keeps the packed result for :meth:`Birder.step` (one fused
decode-and-apply pass per bucket: ū is never a float tensor). The compression,
the pieces, the worker threads, the CUDA stream and the flags are the
engine's; nothing here is FSDP's (see ``optim/fsdp.py`` for that adapter).

What ``.grad`` holds after backward: **this rank's own gradient** (the
bucket is handed back unchanged, not averaged), so clipping, gradient-norm
logging and GradScaler's inf checks see real gradients and cannot rescale
Birder's update (every coordinate moves by at most ``lr`` anyway). If any
rank's gradient had a NaN/Inf this step, the first element of the last
bucket is set to NaN on every rank that had none, so every rank's ``.grad``
is non-finite, as DDP's averaged gradient would be: GradScaler skips the step
and backs off its scale identically on every rank.
"""

import weakref

import torch
import torch.distributed as dist

from dist_supernet.optim.compressor import BirderCompressor, flat_like_memory, memory_perm
from dist_supernet.optim.engine import ExchangeEngine

class _StatesByParam:
    """The newest BirderState of each parameter, by identity (a tensor's == is elementwise, so no
    WeakKeyDictionary); entries go with their parameter."""

    def __init__(self):
        self._entries = {}  # id(param) -> (weakref to param, state)

    def __setitem__(self, param, state):
        key = id(param)
        self._entries[key] = (weakref.ref(param, lambda _, key=key: self._entries.pop(key, None)), state)

    def forget(self, state):
        for key in [k for k, (_, s) in self._entries.items() if s is state]:
            del self._entries[key]

    def get(self, param):
        entry = self._entries.get(id(param))
        if entry is None or entry[0]() is not param:
            return None
        return entry[1]


# Engine states by parameter: Birder(params) and BirderDDP(model)/attach() find each other in any order.
_STATE_OF = _StatesByParam()


class BirderState(ExchangeEngine):
    """State of the Birder comm hook (PowerSGDState-style): the exchange engine over a DDP module's parameters.

    Hyperparameters: ``skip_nonfinite``, ``track_unused``, ``piece_numel`` (see
    :class:`ExchangeEngine`), and those of the compressor (``beta``, ``amsgrad``,
    ``seed``, the 1-bit ``collective``).
    Per-element state: the compressor's ``m``, ``b`` (fp32, canonical order = the
    module's ``parameters()`` order, each parameter in its memory order; 8 bytes per
    parameter); nothing per element besides.
    Per-step state: the grad mask, per-parameter "used" flags, the engine's round.
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
        beta2: float | None = None,
        normalizer: str = "abs",
        grad_clip: float | None = None,
        collective: str | None = "auto",
        requantize: bool = False,
        num_nodes: int | None = None,
        inter_node: str = "auto",
        track_unused: bool = False,
        skip_nonfinite: bool = True,
        timeout_s: float | None = None,
        piece_numel: int | None = None,
    ):
        compressor = BirderCompressor(params, beta=beta, amsgrad=amsgrad, seed=seed, beta2=beta2,
                                      normalizer=normalizer, grad_clip=grad_clip)
        super().__init__(compressor, skip_nonfinite=skip_nonfinite, piece_numel=piece_numel)
        self.track_unused = False
        self.used_local = None
        self.attached = False
        self.superseded_by = None  # the state that replaced this one at attach (another parameter order)
        if collective is not None:
            compressor.connect(collective, requantize=requantize, num_nodes=num_nodes, timeout_s=timeout_s,
                               inter_node=inter_node)
        if track_unused:
            self.enable_unused_tracking()
        # Parameters whose chunk order is their memory order, not the logical one (e.g. channels_last).
        self._strided = [p for p in self.params if not p.is_contiguous() and memory_perm(p) is not None]
        for p in self.params:
            _STATE_OF[p] = self

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

    @staticmethod
    def of(params) -> "BirderState | None":
        """The state that manages the first of ``params`` (from an earlier Birder or BirderDDP), if any."""
        for p in params:
            return _STATE_OF.get(p)
        return None

    def enable_unused_tracking(self) -> None:
        """Count a parameter as used in a step only if its gradient was computed on some rank."""
        if self.track_unused:
            return
        self.track_unused = True
        self.used_local = torch.zeros(len(self.params), dtype=torch.uint8, device=self.compressor.device)
        for i, p in enumerate(self.params):
            if p.requires_grad:
                # A tensor hook runs before the gradient is accumulated, so before DDP's own
                # post-accumulate hook can declare the bucket ready and start the exchange.
                p.register_hook(self._marker(i))

    def _marker(self, position):
        used = self.used_local

        def mark(grad):
            used[position] = 1

        return mark

    def set_grad_mask(self, masks) -> None:
        """Elements that may move in the coming step (True) — the rest keep x, m and b.

        ``masks``: None (every element that got a gradient), a bool tensor over
        all parameters in canonical order (the DDP module's ``parameters()``
        order), or a dict ``{param: bool tensor}`` (parameters left out are
        fully active). Must be identical on every rank: derive it from the
        sampled architectures, never from a local ``grad == 0``.
        """
        comp = self.compressor
        if masks is None:
            self.canonical_mask = None
            return
        if isinstance(masks, torch.Tensor):
            if masks.numel() != comp.numel_total:
                raise ValueError(f"set_grad_mask: a mask of {masks.numel()} elements, the model has {comp.numel_total}")
            flat = masks.reshape(-1).to(device=comp.device, dtype=torch.bool)
            for p in self._strided:  # logical order in, chunk (memory) order for channels_last and the like
                start = comp.offset[p]
                flat[start : start + p.numel()] = flat_like_memory(flat[start : start + p.numel()].view(p.shape), p)
            self.canonical_mask = flat
            return
        flat = torch.ones(comp.numel_total, dtype=torch.bool, device=comp.device)
        for p, mask in masks.items():
            if p not in comp.offset:
                raise ValueError("set_grad_mask: a masked parameter is not managed by this Birder state")
            start = comp.offset[p]
            flat[start : start + p.numel()] = flat_like_memory(mask.reshape(p.shape), p).to(comp.device, torch.bool)
        self.canonical_mask = flat

    def close(self) -> None:
        """End of training: drop the process groups (and this state's registry entries); see ExchangeEngine.close."""
        super().close()
        _STATE_OF.forget(self)


def birder_hook(state: BirderState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: 1 bit per gradient element on the wire; the future hands back this rank's gradient.

    The packed result waits in ``state`` for :meth:`Birder.step`.

    Example::
        ddp_model.register_comm_hook(BirderState.for_ddp(ddp_model), birder_hook)
    """
    grad_D = bucket.buffer()
    chunk = state.compressor.chunk(bucket.parameters())
    if chunk.numel != grad_D.numel():
        raise RuntimeError(f"bucket {bucket.index()} holds {grad_D.numel()} elements, its parameters {chunk.numel}")
    is_last = bucket.is_last()
    used_P = None
    if state.used_local is not None:
        used_P = state.used_local[chunk.positions]  # a copy: the bucket's gradients are all computed now
        if is_last:
            state.used_local.zero_()  # backward is over: the next marks belong to the next step
    exchange = state.submit(grad_D, chunk, used_P=used_P, reduce_used=used_P is not None, is_last=is_last)
    if is_last:
        # The last bucket: return only once every collective of this step is done, so that DDP's own
        # collectives after backward (its unused-parameter all-reduce, from this thread) never run
        # concurrently with the engine's on another communicator (unsafe on NCCL; a hang with
        # CUDA_DEVICE_MAX_CONNECTIONS=1). Nothing is lost: backward has no work left to overlap.
        exchange.done.wait()
    return exchange.future
