"""Birder: binary randomization adaptive optimizer, 1 bit per gradient element per step.

Per worker and element, fp32 ``m`` (momentum) and ``b`` (EMA of |g|):

    m = β·m + (1-β)·g;   b = β·b + (1-β)·|g|;   r = m / b (0 where b = 0)
    u = ±1 with P(+1) = (1 + r) / 2            # unbiased: E[u] = r, 1 bit
    ū = mean of u over workers                  # the 1-bit collective
    x = x - lr·(ū + wd·x)                       # decoupled weight decay

Two modes:

- attached to a DDP module (``Birder(ddp_model)``, ``opt.attach(ddp_model)``
  or :func:`BirderDDP`): the comm hook runs the first four lines per bucket
  during backward and keeps the packed result; :meth:`Birder.step` decodes it
  straight into the last line, one fused pass per bucket. ``.grad`` keeps
  this rank's own gradient (see :mod:`dist_supernet.optim.hook`);
- local (``collective=None``, or one process): :meth:`step` does all of it on
  ``.grad``, drawing the same bits on every rank (right when ``.grad`` is
  already averaged by DDP's own all-reduce, fp16 or PowerSGD hooks).
"""

import logging
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dist_supernet import kernels
from dist_supernet.optim.compressor import check_rule, flat_like_memory, local
from dist_supernet.optim.fsdp import BirderFSDPState, fsdp_world_note, is_dtensor, is_fsdp_module
from dist_supernet.optim.hook import BirderState, birder_hook
from dist_supernet.optim.skips import ReportsSkips, SkipCounter
from dist_supernet.optim.warmup import ddp_bucket_shapes, warm_exchange

log = logging.getLogger(__name__)

_CONSOLIDATE_TIMEOUT_S = 30.0


def _check_positive(name, value, *, allow_zero=False):
    if isinstance(value, (int, float)) and (value != value or value in (float("inf"), float("-inf"))):
        raise ValueError(f"{name}={value!r}: must be finite")
    ok = isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name}={value!r}: must be {'>= 0' if allow_zero else '> 0'}")


# The hyperparameters a BirderState / BirderFSDPState takes from the optimizer (the rest configure the exchange).
_RULE_KEYS = ("beta", "beta2", "normalizer", "grad_clip", "amsgrad", "seed", "skip_nonfinite")


def _hook_kwargs(beta, amsgrad, collective, requantize, num_nodes, inter_node, seed, timeout_s, skip_nonfinite,
                 beta2=None, normalizer="abs", grad_clip=None):
    return dict(beta=beta, beta2=beta2, normalizer=normalizer, grad_clip=grad_clip, amsgrad=amsgrad,
                collective=collective,
                requantize=requantize, num_nodes=num_nodes,
                inter_node=inter_node, seed=seed, timeout_s=timeout_s, skip_nonfinite=skip_nonfinite)


def _attach(ddp_model: DistributedDataParallel, state: BirderState | None, kwargs: dict) -> BirderState:
    """Register the Birder hook on ``ddp_model``, reusing (and, if needed, re-ordering) ``state``.

    The hook's canonical order is the DDP module's ``parameters()`` order (set_grad_mask tensors use it).
    """
    module_params = list(ddp_model.module.parameters())
    kwargs = dict(kwargs)
    if kwargs.get("collective") is None:
        kwargs["collective"] = "auto"
    may_skip = getattr(ddp_model, "find_unused_parameters", False) or getattr(ddp_model, "static_graph", False)
    if state is not None and state.attached:
        raise ValueError("Birder: this optimizer's state is already attached to a DDP module")
    if state is None or [id(p) for p in state.params] != [id(p) for p in module_params]:
        fresh = BirderState(module_params, track_unused=bool(may_skip), **kwargs)
        if state is not None:  # an optimizer built before the wrap: carry its m, b and step over
            for p in state.params:
                if p in fresh.compressor.offset:
                    views = fresh.compressor.views(p)
                    old = state.compressor.views(p)
                    views["m"].copy_(old["m"])
                    views["b"].copy_(old["b"])
            fresh.step = state.step
            fresh.compressor.stats.load_state_dict(state.stats.state_dict())
            state.superseded_by = fresh
        state = fresh
    else:
        if state.collective is None:
            state.compressor.connect(kwargs["collective"], requantize=kwargs["requantize"],
                                     num_nodes=kwargs["num_nodes"], timeout_s=kwargs["timeout_s"],
                                     inter_node=kwargs["inter_node"])
        if may_skip:
            state.enable_unused_tracking()
    ddp_model.register_comm_hook(state, birder_hook)
    state.attached = True
    _warm_kernels(ddp_model, module_params, state)
    return state


def _warm_kernels(ddp_model, params, state) -> None:
    """Compile / load (numba) or tune (Triton) the kernels now, on dummies of the exchange each DDP bucket runs.

    Not inside the first backward on the comm thread, while collectives are in flight (issue 11);
    see dist_supernet.optim.warmup for what is replayed (issue 20).
    """
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        return
    device = trainable[0].device
    kernels.warmup(device)
    warm_exchange(state.compressor, ddp_bucket_shapes(ddp_model, trainable), track_unused=state.used_local is not None,
                  device=device)


def _attach_fsdp(model, state, kwargs: dict, mesh=None, track_unused=False) -> BirderFSDPState:
    """Register the 1-bit all-reduce hook on every FSDP module of ``model`` (see optim/fsdp.py).

    The state's canonical order is the model's ``parameters()`` order (set_grad_mask tensors use it).
    """
    module_params = list(model.parameters())
    if state is not None and state.attached:
        raise ValueError("Birder: this optimizer's state is already attached to a model")
    if not all(is_dtensor(p) for p in module_params):
        raise ValueError("Birder.attach: some parameters of this FSDP model are not sharded DTensors; apply "
                         "fully_shard to the root module too")
    hyper = {k: kwargs[k] for k in _RULE_KEYS}
    if (not isinstance(state, BirderFSDPState) or [id(p) for p in state.params] != [id(p) for p in module_params]
            or state.track_unused != bool(track_unused)):
        fresh = BirderFSDPState(module_params, track_unused=track_unused, **hyper)
        if state is not None:  # an optimizer over another parameter order: carry its m, b and step over
            for p in state.params:
                if p in fresh.compressor.offset:
                    for name, view in fresh.compressor.views(p).items():
                        view.copy_(state.compressor.views(p)[name])
            fresh.step = state.step
            fresh.compressor.stats.load_state_dict(state.stats.state_dict())
            state.superseded_by = fresh
        state = fresh
    collective = kwargs.get("collective") or "auto"
    state.connect_mesh(mesh, collective, num_nodes=kwargs.get("num_nodes"), requantize=kwargs["requantize"],
                       inter_node=kwargs["inter_node"], timeout_s=kwargs["timeout_s"])
    state.attach_modules(model)
    log.info("Birder on FSDP2: %s; collective %s", fsdp_world_note(state.num_nodes), state.collective.name)
    params = [p for p in module_params if p.requires_grad]
    if params:
        kernels.warmup(local(params[0]).device, sorted({state.chunk_of(g, state._layouts[g])[0].numel
                                                         for g in state._layouts}))
    return state


def BirderDDP(module, *, beta=0.9, amsgrad=False, collective="auto", requantize=False, num_nodes=None,
              inter_node="auto", seed=0, timeout_s=None, skip_nonfinite=True, beta2=None, normalizer="abs",
              grad_clip=None, **ddp_kwargs) -> DistributedDataParallel:
    """DistributedDataParallel with the Birder 1-bit hook registered.

    A :class:`Birder` built from the module's parameters, before or after this
    call, uses the hook's state.

    Example::
        ddp_model = BirderDDP(model, collective="hierarchical", find_unused_parameters=True)
        opt = Birder(ddp_model, lr=3e-4, weight_decay=0.01)
    """
    ddp_model = DistributedDataParallel(module, **ddp_kwargs)
    existing = BirderState.of(list(module.parameters()))
    kwargs = _hook_kwargs(beta, amsgrad, collective, requantize, num_nodes, inter_node, seed, timeout_s,
                          skip_nonfinite, beta2, normalizer, grad_clip)
    if existing is not None:  # an optimizer came first: its hyperparameters win
        kwargs.update(beta=existing.compressor.beta, beta2=existing.compressor.beta2,
                      normalizer=existing.compressor.normalizer, grad_clip=existing.compressor.clip,
                      amsgrad=existing.compressor.amsgrad,
                      seed=existing.compressor.seed, skip_nonfinite=existing.skip_nonfinite)
    _attach(ddp_model, existing, kwargs)
    return ddp_model


class Birder(ReportsSkips, torch.optim.Optimizer):
    """The Birder optimizer (a real ``torch.optim.Optimizer``: param_groups, LR schedulers, state_dict).

    Args:
        params: parameters, param groups (each group's own ``lr`` and
            ``weight_decay``), a module, or a DDP module (which registers the
            1-bit hook at once). Built before the DDP wrap, call
            ``opt.attach(ddp_model)`` after it (or use :func:`BirderDDP`).
        lr: step size; every coordinate moves at most ``lr·(1 + wd·|x|)`` per step.
        beta: EMA factor of m (and of b, unless ``beta2``), in [0, 1).
        weight_decay: decoupled weight decay.
        amsgrad: keep b non-decreasing (b = max(b_prev, b)).
        normalizer: ``"abs"`` (the paper): b is the EMA of |g| and r = m / b; ``"rms"``: b is the EMA
            of g² and r = m̂ / sqrt(b̂) (Adam's bias-corrected second moment; |r| > 1 sends the sign's
            bit). On transformers ``"rms"`` with ``beta2=0.999`` takes a ~4x larger lr (README).
        beta2: EMA factor of b, in [0, 1); None: ``beta`` (then r needs no bias correction under ``"abs"``).
        grad_clip: this rank's gradient enters m and b scaled to this norm when its norm is larger (AdamW's
            clipping, per worker: Birder's update is otherwise invariant to it). The exchange then starts
            after backward (the norm needs the whole gradient) instead of overlapping it. DDP and local
            mode; not under FSDP2 yet.
        collective: ``auto`` (hierarchical across nodes; on one node allgather up to 4 ranks, two_phase beyond),
            ``allgather``, ``two_phase`` or ``hierarchical``; ``None``: local mode on
            purpose (the gradient is averaged by someone else, e.g. DDP's fp32 all-reduce).
        requantize: ``two_phase`` sends 1 re-quantised bit in its second phase.
        num_nodes: node count for ``hierarchical``; None reads torchrun's LOCAL_WORLD_SIZE.
        inter_node: ``hierarchical``'s inter-node form: ``auto``, ``allgather``, ``reduce_scatter``.
        seed: base seed of every random draw.
        timeout_s: timeout of the hook's collectives (None: the process group's).
        skip_nonfinite: if any rank's gradient has NaN/Inf, every rank skips the
            step (x unchanged; the non-finite elements never entered m and b, the
            finite elements of that step did). ``skips`` (a :class:`SkipCounter`:
            ``skipped_steps``, ``consecutive_skips``, ``last_skip``) says so; ``last_skip["param"]``
            is this rank's first offending parameter (None if its own gradient was finite).
            One tiny all-reduce per step.

    Example::
        opt = Birder(model.parameters(), lr=3e-4, weight_decay=0.01)   # was: AdamW(...)
        ddp_model = DistributedDataParallel(model)
        opt.attach(ddp_model)                                          # the 1-bit exchange
        loss_fn(ddp_model(x), y).backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params, lr=1e-3, beta=0.9, weight_decay=0.0, amsgrad=False, *,
                 collective="auto", requantize=False, num_nodes=None, inter_node="auto", seed=0, timeout_s=None,
                 skip_nonfinite=True, beta2=None, normalizer="abs", grad_clip=None):
        _check_positive("lr", lr)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        check_rule(beta, beta2, normalizer, grad_clip)
        ddp_model = params if isinstance(params, DistributedDataParallel) else None
        fsdp_model = params if is_fsdp_module(params) else None
        if ddp_model is not None:
            params = list(ddp_model.module.parameters())
        elif isinstance(params, torch.nn.Module):
            params = list(params.parameters())
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        for group in self.param_groups:
            _check_positive("lr", group["lr"])
            _check_positive("weight_decay", group["weight_decay"], allow_zero=True)
        own = [p for group in self.param_groups for p in group["params"]]
        self._hook_kwargs = _hook_kwargs(beta, amsgrad, collective, requantize, num_nodes, inter_node, seed,
                                         timeout_s, skip_nonfinite, beta2, normalizer, grad_clip)
        self.local_on_purpose = collective is None
        sharded = [is_dtensor(p) for p in own]
        if any(sharded) and not all(sharded):
            raise ValueError("Birder: the parameters mix FSDP2-sharded DTensors and plain tensors; shard the whole "
                             "model with fully_shard (the root too) or none of it")
        existing = BirderState.of(own)
        if existing is not None and not all(p in existing.compressor.offset for p in own):
            raise ValueError("Birder: a parameter group holds a parameter that the DDP module does not")
        if existing is not None and existing.attached:
            state = existing  # BirderDDP(model) or another Birder attached it already
        elif ddp_model is not None:
            state = _attach(ddp_model, existing, self._hook_kwargs)
        elif any(sharded):
            # FSDP2: m, b for this rank's shards only. Unattached, Birder runs on each rank's .grad shard
            # (plain FSDP or native HSDP: the gradient is reduced already); attach for the 1-bit exchange.
            state = BirderFSDPState(own, **{k: self._hook_kwargs[k] for k in _RULE_KEYS})
            if fsdp_model is not None:
                state = _attach_fsdp(fsdp_model, state, self._hook_kwargs)
        else:
            state = BirderState(own, **{**self._hook_kwargs, "collective": None})
        self._state = state
        self._link_state()
        self._warned_unattached = False
        self._chunk_groups = {}
        # Steps skipped because some rank's gradient had NaN/Inf (see skip_nonfinite).
        self.skips = SkipCounter()

    @property
    def last_skip(self) -> dict | None:
        return self.skips.last_skip

    @property
    def hook_state(self) -> BirderState:
        """The hook's state (follows the attach of an optimizer built before the DDP wrap)."""
        state = self._state
        if state.superseded_by is not None:
            while state.superseded_by is not None:
                state = state.superseded_by
            self._state = state
            self._link_state()
            self._chunk_groups.clear()
        return state

    @property
    def hooked(self) -> bool:
        """True when the 1-bit hook is attached to a DDP module."""
        return self.hook_state.attached

    def attach(self, model, *, mesh=None, track_unused: bool = False):
        """Register the 1-bit exchange on ``model`` (call on every rank, after the wrap); returns ``model``.

        ``model``: a ``DistributedDataParallel`` module (the comm hook replaces DDP's fp32 all-reduce),
        or an FSDP2 model sharded with ``fully_shard`` over the ranks of each node (1-bit HSDP: FSDP's
        reduce-scatter inside the node, one bit per element across nodes; see optim/fsdp.py). For
        FSDP2: ``mesh`` is the 2-D ``(replicate, shard)`` mesh (:func:`~dist_supernet.optim.fsdp.hsdp_mesh`;
        None: torchrun's nodes, or ``num_nodes``); ``track_unused=True`` when some parameters may get no
        gradient in a step (conditional control flow), as DDP's ``find_unused_parameters``.

        Example::
            opt = Birder(param_groups, lr=3e-4)
            ddp_model = opt.attach(DistributedDataParallel(model))

            mesh = hsdp_mesh()                                   # FSDP2: (nodes, ranks per node)
            for block in model.blocks:
                fully_shard(block, mesh=mesh["shard"])
            fully_shard(model, mesh=mesh["shard"])
            opt = Birder(model.parameters(), lr=3e-4)            # was: AdamW(...)
            opt.attach(model, mesh=mesh)
        """
        if self.hook_state.attached:
            raise ValueError("Birder.attach: the hook is already attached")
        if is_fsdp_module(model):
            _attach_fsdp(model, self.hook_state, self._hook_kwargs, mesh=mesh, track_unused=track_unused)
        elif isinstance(model, DistributedDataParallel):
            if mesh is not None:
                raise ValueError("Birder.attach: mesh= is for FSDP2 models; DDP takes its ranks from torchrun")
            _attach(model, self.hook_state, self._hook_kwargs)
        else:
            raise TypeError("Birder.attach: expected a DistributedDataParallel module or an FSDP2 model "
                            f"(fully_shard), got {type(model).__name__}")
        self.hook_state  # follows the attached state, re-links m, b
        return model

    # -- state shared with the hook ----------------------------------------------------

    def _link_state(self):
        comp = self._state.compressor
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = comp.views(p)

    @property
    def compressor(self):
        return self.hook_state.compressor

    @property
    def comm_stats(self):
        """Bytes this rank put on the wire (``CommStats``)."""
        return self.hook_state.stats

    @property
    def num_steps(self) -> int:
        return self.hook_state.step

    def set_grad_mask(self, masks) -> None:
        """Restrict the coming step to these elements; see :meth:`BirderState.set_grad_mask`."""
        self.hook_state.set_grad_mask(masks)

    # -- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        state = self.hook_state
        if state.attached:
            round_ = state.take_round()
            if round_ is None:
                return loss  # no exchange since the last step (no backward, or only no_sync ones)
            if state.skip_nonfinite and self._skip(round_.nonfinite_ranks):
                return loss
            table = self._lr_wd_table()
            for chunk, packed, used_P in round_.entries:
                self._apply(chunk, packed, used_P, table)
        else:
            self._warn_if_unattached()
            self._local_step()
        state.end_step()
        return loss

    def _group_index(self, chunk):
        """Per-parameter group index of ``chunk`` on the state's device (G: in no group), cached per chunk."""
        cached = self._chunk_groups.get(id(chunk))
        if cached is None or cached[0] is not chunk:
            group_of = {p: g for g, group in enumerate(self.param_groups) for p in group["params"]}
            missing = len(self.param_groups)  # the trailing zero row of the table below
            index = torch.tensor([group_of.get(p, missing) for p in chunk.params], dtype=torch.int64)
            cached = (chunk, index.to(self.hook_state.compressor.device))
            self._chunk_groups[id(chunk)] = cached
        return cached[1]

    def _lr_wd_table(self):
        """float32 [G + 1, 2] on the device: each group's (lr, weight_decay), then zeros.

        Cached by value: built again only when some group's lr or weight decay changed (an LR
        scheduler changes lr every step), then by one copy from pinned memory, which does not
        wait for the GPU (a copy from pageable memory synchronizes the stream first).
        """
        values = tuple((float(g["lr"]), float(g["weight_decay"])) for g in self.param_groups)
        cached = getattr(self, "_table", None)
        if cached is not None and cached[0] == values:
            return cached[1]
        rows = torch.tensor([*values, (0.0, 0.0)], dtype=torch.float32)
        device = self.hook_state.compressor.device
        if device.type == "cuda":
            rows = rows.pin_memory()  # torch's host allocator keeps it until the copy is done
        table = rows.to(device, non_blocking=True)
        self._table = (values, table)
        self._chunk_rates = {}  # per chunk: (chunk, table, lr_P, wd_P) for this table
        return table

    def _apply(self, chunk, packed, used_P, table):
        # Launches that ran untuned since the last step (DDP's rebuilt buckets, a grad mask set late) are
        # tuned here, on dummies, where no collective is in flight; a no-op otherwise (issue 20).
        kernels.tune_missed()
        rates = getattr(self, "_chunk_rates", {}).get(id(chunk))
        if rates is None or rates[0] is not chunk or rates[1] is not table:
            rows = table[self._group_index(chunk)]  # [P, 2] on the device: a gather, no host work per parameter
            rates = (chunk, table, rows[:, 0].contiguous(), rows[:, 1].contiguous())
            if len(self.__dict__.setdefault("_chunk_rates", {})) > 4096:  # chunks of old bucket layouts
                self._chunk_rates.clear()
            self._chunk_rates[id(chunk)] = rates
        lr_P, wd_P = rates[2], rates[3]
        kernels.apply_packed_(
            chunk.param_views(), chunk.seg_starts, chunk.seg_canon, packed.payload, planes=packed.planes,
            num_rows=packed.num_rows, lr_P=lr_P, wd_P=wd_P, mask_T=self.hook_state.canonical_mask, used_P=used_P,
        )

    def _skip(self, nonfinite_ranks) -> bool:
        """True (the step is skipped on every rank, x unchanged) if any rank saw NaN/Inf. One host read."""
        if nonfinite_ranks is None:
            return False
        host = nonfinite_ranks
        if nonfinite_ranks.is_cuda:  # the step's one host sync: one copy into pinned memory
            host = torch.empty(nonfinite_ranks.shape, dtype=nonfinite_ranks.dtype, pin_memory=True)
            host.copy_(nonfinite_ranks, non_blocking=True)
            torch.cuda.current_stream(nonfinite_ranks.device).synchronize()
        ranks = torch.nonzero(host).flatten().tolist()
        if not ranks:
            self.skips.stepped()
            return False
        state = self.hook_state
        # Rare path (a skip, decided alike on every rank): name the parameters. Ranks that saw NaN/Inf
        # flag theirs from .grad (their own gradient, untouched); the others, whose .grad got the hook's
        # NaN marker, flag none; one MAX all-reduce gives every rank the same list.
        flags = torch.zeros(len(state.params), dtype=torch.uint8)
        if state.flag_topology.rank in ranks:
            flags[self._nonfinite_positions(state.params)] = 1
        flags = flags.to(state.compressor.device)
        state.all_reduce_flags("all-reduce non-finite parameters", flags)
        self._record_skip(ranks, torch.nonzero(flags.cpu()).flatten().tolist())
        state.end_step()
        return True

    def _nonfinite_positions(self, params) -> list[int]:
        """Compressor positions of ``params`` whose ``.grad`` holds NaN/Inf (the rare skip path only)."""
        position = self.hook_state.compressor.position
        return [position[p] for p in params if p.grad is not None and not bool(torch.isfinite(local(p.grad)).all())]

    def _record_skip(self, ranks, bad) -> None:
        param = self.hook_state.params[bad[0]] if bad else None
        self.skips.skipped({"step": self.hook_state.step, "ranks": ranks, "param_index": bad[0] if bad else None,
                            "param": param, "num_params": len(bad)})

    def _local_step(self):
        """Local mode: compress each gradient to one bit with the same draws on every rank, apply."""
        state = self.hook_state
        comp = state.compressor
        params = [p for group in self.param_groups for p in group["params"]]
        if not params:
            return
        chunk = comp.chunk(params)
        with_grad = [p.grad is not None for p in params]
        if not any(with_grad):
            return
        grads = [flat_like_memory(local(p.grad), local(p)) if p.grad is not None
                 else torch.zeros(local(p).numel(), dtype=torch.float32, device=comp.device) for p in params]
        grad_D = torch.cat(grads) if len(grads) > 1 else grads[0]
        used_P = torch.tensor(with_grad, dtype=torch.uint8, device=comp.device)
        flag = torch.zeros(1, dtype=torch.uint8, device=comp.device)
        if comp.clip is not None:
            comp.set_grad_norm(float(torch.linalg.vector_norm(grad_D, dtype=torch.float32)))
        packed = comp.exchange(grad_D, chunk, mask_T=state.canonical_mask, used_P=used_P, flag=flag)
        if state.skip_nonfinite and isinstance(state, BirderFSDPState) and dist.is_initialized():
            # Each rank holds another shard of the reduced gradient: a NaN in one shard skips the step everywhere.
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if state.skip_nonfinite and bool(flag[0]):
            # The gradient is the same on every rank (averaged already): this rank decides for all.
            self._record_skip(None, self._nonfinite_positions(params))
            return
        self.skips.stepped()
        self._apply(chunk, packed, used_P, self._lr_wd_table())

    def _warn_if_unattached(self):
        if self._warned_unattached or self.local_on_purpose:
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1 and isinstance(self.hook_state, BirderFSDPState):
            log.warning(
                "Birder: %d ranks, FSDP2-sharded parameters and no 1-bit exchange attached: Birder runs on each "
                "rank's shard of the gradient FSDP reduced (0 bytes saved); for 1-bit HSDP shard over each node's "
                "ranks and call opt.attach(model, mesh=mesh); collective=None says this is on purpose", world)
            warnings.warn("Birder runs without its 1-bit exchange in a multi-rank FSDP job (see the log)",
                          stacklevel=3)
        elif world > 1:
            log.warning(
                "Birder: %d ranks but no 1-bit hook is attached, so no gradient is compressed (0 bytes saved); "
                "call opt.attach(ddp_model) after DistributedDataParallel(...), or pass Birder(ddp_model, ...); "
                "collective=None runs Birder on an already averaged gradient on purpose", world)
            warnings.warn("Birder runs without its 1-bit hook in a multi-rank job (see the log)", stacklevel=3)
        self._warned_unattached = True

    # -- checkpoints -------------------------------------------------------------------

    def rank_state(self) -> dict:
        """This rank's live flat state: ``{"m", "b"}`` fp32 [T] in canonical order (no copy, no collective).

        FSDP2-sharded parameters: ``{}``; their m, b are saved per replica (:meth:`replica_state`).
        """
        if isinstance(self.hook_state, BirderFSDPState):
            return {}
        comp = self.hook_state.compressor
        return {"m": comp.m, "b": comp.b}

    def replica_state(self) -> tuple[str, dict] | None:
        """FSDP2: ``(key, {parameter index: {"m", "b"}})``: this rank's m, b as DTensors sharded like each
        parameter (views of the live state), under a key of its replica (None for DDP and local mode).

        Save it with ``torch.distributed.checkpoint`` beside the model: the replicas' m, b differ, and one
        key per replica keeps DCP from keeping one replica's copy for all (it de-duplicates equal keys);
        loaded in place on the same layout, resharded by DCP on another shard count.

        Example::
            key, state = opt.replica_state()
            dcp.save({"model": model.state_dict(), key: state}, checkpoint_id=path)
        """
        state = self.hook_state
        if not isinstance(state, BirderFSDPState):
            return None
        return f"birder_replica{state.replica_index():03d}", state.sharded_state()

    def load_rank_state(self, state: dict) -> None:
        """Copy a saved :meth:`rank_state` into the live state."""
        self.hook_state.compressor.load_flat(state["m"], state["b"])

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collect every rank's m and b on rank ``to`` for its next ``state_dict()`` — a collective.

        Call it on EVERY rank (like torch's ZeroRedundancyOptimizer). Called on
        some ranks only, it raises within 30 s naming the ranks that arrived,
        instead of hanging. Checkpoints of the training app do not use it: each
        rank saves its own m, b (torch.distributed.checkpoint).
        """
        topo = self.hook_state.flag_topology  # every rank of the job, like state_dict / load_state_dict
        # Rows in param-group order (the state dict's parameter indices), not the compressor's canonical
        # order: that is the DDP module's order once attached, the groups' before, and a Birder may load
        # before its attach (the Hugging Face Trainer loads its checkpoint, then the callback attaches).
        comp = self.compressor
        own = self._own_params()
        flat = torch.stack([torch.cat([comp.views(p)[key].reshape(-1) for p in own]) if own else
                            torch.zeros(0, device=comp.device) for key in ("m", "b")])
        self._consolidated_step = self.hook_state.step
        if not (dist.is_available() and dist.is_initialized()) or topo.world_size == 1:
            self._consolidated = flat.unsqueeze(0).clone()
            return
        self._arrive_all("consolidate_state_dict")
        rows = [torch.empty_like(flat) for _ in range(topo.world_size)] if topo.rank == to else None
        dist.gather(flat, gather_list=rows, dst=to)
        self._consolidated = torch.stack(rows) if topo.rank == to else None

    def _own_params(self) -> list:
        """The parameters of every group, in the state dict's index order."""
        return [p for group in self.param_groups for p in group["params"]]

    def _load_in_group_order(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` ([2 (m, b), T], param-group order, see consolidate_state_dict) into the live views."""
        comp = self.hook_state.compressor
        views = [comp.views(p) for p in self._own_params()]  # FSDP2: this rank's shard of each parameter
        total = sum(v["m"].numel() for v in views)
        if flat.shape[-1] != total:
            raise ValueError(f"Birder.load_state_dict: per_rank holds {flat.shape[-1]} elements per rank, this "
                             f"optimizer's param groups hold {total}")
        offset = 0
        for view in views:
            n = view["m"].numel()
            for row, key in enumerate(("m", "b")):
                view[key].copy_(flat[row, offset:offset + n].reshape(view[key].shape))
            offset += n

    def _arrive_all(self, what: str) -> None:
        """A store rendezvous with a deadline: a call made on one rank only fails in one line instead of hanging."""
        store = dist.distributed_c10d._get_default_store()
        world, rank = dist.get_world_size(), dist.get_rank()
        self._arrivals = getattr(self, "_arrivals", 0) + 1
        key = f"birder/{what}/{self._arrivals}"
        store.set(f"{key}/rank{rank}", "1")
        count = store.add(key, 1)
        deadline = time.monotonic() + _CONSOLIDATE_TIMEOUT_S
        while count < world:
            if time.monotonic() > deadline:
                arrived = [r for r in range(world) if store.check([f"{key}/rank{r}"])]
                # Undo this arrival, so that a later call on every rank meets under the same key.
                store.add(key, -1)
                store.delete_key(f"{key}/rank{rank}")
                self._arrivals -= 1
                raise RuntimeError(f"Birder.{what}() is a collective: call it on every rank (only ranks {arrived} "
                                   f"of {world} called it within {_CONSOLIDATE_TIMEOUT_S:.0f} s)")
            time.sleep(0.01)
            count = store.add(key, 0)

    def state_dict(self):
        """torch's convention: this rank's own state (m, b per parameter), no collective; plus ``birder`` extras."""
        state_dict = super().state_dict()
        topo = self.hook_state.flag_topology  # every rank of the job (FSDP: the replica topology is smaller)
        per_rank = getattr(self, "_consolidated", None)
        if per_rank is not None and getattr(self, "_consolidated_step", None) != self.hook_state.step:
            # Taken before a step that moved m, b: an exact resume from it would be silently wrong.
            warnings.warn(f"Birder: the m, b consolidated at step {self._consolidated_step} are left out of this "
                          f"step-{self.hook_state.step} state dict (call consolidate_state_dict() right before "
                          "saving)", stacklevel=2)
            per_rank = None
        state_dict["birder"] = {
            "step": self.hook_state.step,
            "seed": self.hook_state.compressor.seed,
            "beta": self.hook_state.compressor.beta,
            "beta2": self.hook_state.compressor.beta2,
            "normalizer": self.hook_state.compressor.normalizer,
            "grad_clip": self.hook_state.compressor.clip,
            "world_size": topo.world_size,
            "rank": topo.rank,
            "comm_stats": self.hook_state.stats.state_dict(),
            "num_nodes": getattr(self.hook_state, "num_nodes", None),  # FSDP2: the replicas m, b was saved by
            # [world_size, 2 (m, b), T] after consolidate_state_dict(), else absent; T in param-group order
            "per_rank": per_rank,
            "per_rank_order": "param_groups",
        }
        self._consolidated = None
        return state_dict

    def load_state_dict(self, state_dict):
        """Load; with every rank's m, b (consolidated) each rank takes its own row.

        A state dict of another rank or world size (e.g. saved on rank 0 only):
        every rank starts from its m, b (or the mean of all saved ranks') and a
        warning says so. Parameters, lr and the step count resume exactly either way.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("birder", None) or {}
        saved = {i: dict(s) for i, s in state_dict.get("state", {}).items()}
        super().load_state_dict(state_dict)
        topo = self.hook_state.flag_topology
        comp = self.hook_state.compressor
        per_rank = extra.get("per_rank")
        if per_rank is not None:
            if per_rank.shape[0] == topo.world_size:
                flat = per_rank[topo.rank]
            else:
                warnings.warn(
                    f"Birder: checkpoint holds m, b of {per_rank.shape[0]} ranks, this job has "
                    f"{topo.world_size}: every rank starts from their mean", stacklevel=2,
                )
                flat = per_rank.mean(dim=0)
            if extra.get("per_rank_order") == "param_groups":
                self._load_in_group_order(flat)
            else:  # written before per_rank_order existed: the compressor's canonical order
                comp.load_flat(flat[0], flat[1])
        else:
            saved_world = extra.get("world_size", topo.world_size)
            if saved_world != topo.world_size or extra.get("rank", topo.rank) != topo.rank:
                warnings.warn(
                    f"Birder: state dict holds the m, b of rank {extra.get('rank')} of {saved_world} only: "
                    "every rank of this job starts from them (for an exact resume every rank saves and loads "
                    "its own state_dict(), or use torch.distributed.checkpoint)", stacklevel=2,
                )
            own = [p for g in self.param_groups for p in g["params"]]
            for i, p in enumerate(own):
                st = saved.get(i)
                if st is not None and "m" in st:
                    views = comp.views(p)
                    views["m"].copy_(st["m"].reshape(views["m"].shape))
                    views["b"].copy_(st["b"].reshape(views["b"].shape))
        self._link_state()  # Optimizer.load_state_dict replaced the state dicts: point them at the live views
        self.hook_state.step = int(extra.get("step", self.hook_state.step))
        # Byte counters are per rank: only a state dict saved by this very rank restores them.
        if "comm_stats" in extra and extra.get("rank") == topo.rank and extra.get("world_size") == topo.world_size:
            self.hook_state.stats.load_state_dict(extra["comm_stats"])
