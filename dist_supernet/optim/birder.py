"""Birder: binary randomization adaptive optimizer, 1 bit per gradient element per step.

Per worker and element, fp32 ``m`` (momentum) and ``b`` (EMA of |g|):

    m = β·m + (1-β)·g;   b = β·b + (1-β)·|g|;   r = m / b (0 where b = 0)
    u = ±1 with P(+1) = (1 + r) / 2            # unbiased: E[u] = r, 1 bit
    ū = mean of u over workers                  # the 1-bit collective
    x = x - lr·(ū + wd·x)                       # decoupled weight decay

Two modes:

- built from a DDP module (or after :func:`BirderDDP`): the comm hook does
  the first four lines per bucket during backward, DDP writes ū into ``.grad``
  and :meth:`Birder.step` applies the last line;
- built from parameters: :meth:`step` does all of it locally on ``.grad``,
  drawing the same bits on every rank (right when ``.grad`` is already
  averaged by DDP's own all-reduce, fp16 or PowerSGD hooks, or with one process).
"""

import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import kernels
from dist_supernet.optim.hook import BirderState, birder_hook


def _check_positive(name, value, *, allow_zero=False):
    ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, (int, float)) or not ok:
        raise ValueError(f"{name}={value!r}: must be {'>= 0' if allow_zero else '> 0'}")


def BirderDDP(module, *, beta=0.9, amsgrad=False, collective="two_phase", requantize=False,
              num_nodes=None, seed=0, timeout_s=None, skip_nonfinite=True,
              **ddp_kwargs) -> DistributedDataParallel:
    """DistributedDataParallel with the Birder 1-bit hook registered.

    Pass the result to :class:`Birder`, which reuses the hook's state.

    Example::
        ddp_model = BirderDDP(model, collective="hierarchical", find_unused_parameters=True)
        opt = Birder(ddp_model, lr=3e-4, weight_decay=0.01)
    """
    ddp_model = DistributedDataParallel(module, **ddp_kwargs)
    _attach_hook(ddp_model, beta=beta, amsgrad=amsgrad, collective=collective, requantize=requantize,
                 num_nodes=num_nodes, seed=seed, timeout_s=timeout_s, skip_nonfinite=skip_nonfinite)
    return ddp_model


def _attach_hook(ddp_model, **kwargs) -> BirderState:
    state = BirderState.for_ddp(ddp_model, **kwargs)
    ddp_model.register_comm_hook(state, birder_hook)
    ddp_model._birder_state = state
    return state


class Birder(torch.optim.Optimizer):
    """The Birder optimizer (a real ``torch.optim.Optimizer``: param_groups, LR schedulers, state_dict).

    Args:
        params: a DDP module (registers the 1-bit hook: the one-line swap-in),
            or parameters / param groups (local mode).
        lr: step size; every coordinate moves at most ``lr·(1 + wd·|x|)`` per step.
        beta: EMA factor of m and b, in [0, 1).
        weight_decay: decoupled weight decay.
        amsgrad: keep b non-decreasing (b = max(b_prev, b)).
        collective: ``allgather``, ``two_phase`` or ``hierarchical`` (DDP mode).
        requantize: ``two_phase`` sends 1 re-quantised bit in its second phase.
        num_nodes: node count for ``hierarchical``; None reads torchrun's LOCAL_WORLD_SIZE.
        seed: base seed of every random draw.
        timeout_s: timeout of the hook's collectives (None: the process group's).
        skip_nonfinite: if any rank's gradient has NaN/Inf, every rank skips the
            step (x, m, b unchanged; ``skipped_steps``, ``consecutive_skips`` and
            ``last_skip`` say so). Costs a snapshot copy of m, b per bucket and one
            small all-reduce per step.

    Example::
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        opt = Birder(ddp_model, lr=3e-4, weight_decay=0.01)   # was: AdamW(model.parameters(), ...)
        loss_fn(ddp_model(x), y).backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params, lr=1e-3, beta=0.9, weight_decay=0.0, amsgrad=False, *,
                 collective="two_phase", requantize=False, num_nodes=None, seed=0, timeout_s=None,
                 skip_nonfinite=True):
        _check_positive("lr", lr)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta!r}: must be in [0, 1)")
        ddp_model = params if isinstance(params, DistributedDataParallel) else None
        if ddp_model is not None:
            params = [p for p in ddp_model.module.parameters()]
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        own = [p for group in self.param_groups for p in group["params"]]
        if ddp_model is not None:
            self.hook_state = getattr(ddp_model, "_birder_state", None) or _attach_hook(
                ddp_model, beta=beta, amsgrad=amsgrad, collective=collective, requantize=requantize,
                num_nodes=num_nodes, seed=seed, timeout_s=timeout_s, skip_nonfinite=skip_nonfinite,
            )
            self.hooked = True
        else:
            self.hook_state = BirderState(own, beta=beta, amsgrad=amsgrad, seed=seed, collective=None,
                                          skip_nonfinite=skip_nonfinite)
            self.hooked = False
        for p in own:
            if p not in self.hook_state.param_state:
                raise ValueError("Birder: a parameter group holds a parameter that the DDP module does not")
        self._link_state()
        self._consolidated = None
        # Steps skipped because some rank's gradient had NaN/Inf (see skip_nonfinite).
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_skip = None

    # -- state shared with the hook ----------------------------------------------------

    def _link_state(self):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = self.hook_state.param_state[p]

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
        if state.skip_nonfinite and self._skip_nonfinite_step():
            return loss
        if not self.hooked:
            self._local_exchange()
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                mask = state.param_mask(p)
                if mask is False:
                    continue
                kernels.apply_update_(p, p.grad, lr=lr, weight_decay=weight_decay, mask=mask)
        state.end_step()
        return loss

    def _skip_nonfinite_step(self) -> bool:
        """True (and the step is skipped on every rank, x, m, b unchanged) if any rank saw NaN/Inf."""
        state = self.hook_state
        if self.hooked:
            bad = state.nonfinite_params()
        else:
            # Local mode: the gradient is already the same on every rank (averaged by DDP).
            bad = [i for i, p in enumerate(state.params)
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if not bad:
            self.consecutive_skips = 0
            return False
        state.restore_touched()
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.last_skip = {"step": state.step, "param_index": bad[0], "num_params": len(bad)}
        state.end_step()
        return True

    def _local_exchange(self):
        """Compress each gradient to ±1 in place, same draws on every rank (local mode)."""
        state = self.hook_state
        seed = state.step_seed()
        for p in state.params:
            if p.grad is None:
                continue
            start = state.offset[p]
            index = torch.arange(start, start + p.numel(), dtype=torch.int32, device=p.device)
            mask = state.param_mask(p)
            mask = None if mask is None else mask.reshape(-1)
            st = state.param_state[p]
            bits = kernels.compress(
                p.grad.reshape(-1), st["m"].view(-1), st["b"].view(-1), index,
                beta=state.beta, seed=seed, mask=mask, amsgrad=state.amsgrad,
            )
            p.grad.copy_(kernels.unpack_mean(bits.view(1, -1), p.numel(), mask=mask).view_as(p))

    # -- checkpoints -------------------------------------------------------------------

    def _flat_state(self, key):
        params = self.hook_state.params
        if not params:
            return torch.zeros(0)
        return torch.cat([self.hook_state.param_state[p][key].reshape(-1) for p in params])

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collect every rank's m and b on rank ``to`` (call on all ranks), for its state_dict.

        Same convention as torch's ZeroRedundancyOptimizer: call on every rank,
        then ``state_dict()`` on rank ``to`` holds the m, b of all ranks.
        """
        topo = self.hook_state.topology
        flat = torch.stack([self._flat_state("m"), self._flat_state("b")])
        if not (dist.is_available() and dist.is_initialized()) or topo.world_size == 1:
            self._consolidated = flat.unsqueeze(0).clone()
            return
        rows = [torch.empty_like(flat) for _ in range(topo.world_size)] if topo.rank == to else None
        dist.gather(flat, gather_list=rows, dst=to)
        self._consolidated = torch.stack(rows) if topo.rank == to else None

    def state_dict(self):
        state_dict = super().state_dict()
        topo = self.hook_state.topology
        state_dict["birder"] = {
            "step": self.hook_state.step,
            "seed": self.hook_state.seed,
            "beta": self.hook_state.beta,
            "world_size": topo.world_size,
            "rank": topo.rank,
            "comm_stats": self.hook_state.stats.state_dict(),
            # [world_size, 2 (m, b), T] after consolidate_state_dict(), else absent
            "per_rank": self._consolidated,
        }
        self._consolidated = None
        return state_dict

    def load_state_dict(self, state_dict):
        """Load; with every rank's m, b (consolidated) each rank takes its own row.

        Different world size (or a state dict of one rank only): every rank
        starts from the mean of the saved ranks' m and b (|mean m| <= mean b
        keeps r in [-1, 1]) and a warning says so. Parameters, lr and the
        step count resume exactly either way.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("birder", None) or {}
        saved = {i: dict(s) for i, s in state_dict.get("state", {}).items()}
        super().load_state_dict(state_dict)
        topo = self.hook_state.topology
        per_rank = extra.get("per_rank")
        own = self.hook_state.params
        if per_rank is not None:
            if per_rank.shape[0] == topo.world_size:
                flat = per_rank[topo.rank]
            else:
                warnings.warn(
                    f"Birder: checkpoint holds m, b of {per_rank.shape[0]} ranks, this job has "
                    f"{topo.world_size}: every rank starts from their mean", stacklevel=2,
                )
                flat = per_rank.mean(dim=0)
            self._set_flat_state(flat[0], flat[1])
        else:
            saved_world = extra.get("world_size", topo.world_size)
            if saved_world != topo.world_size or extra.get("rank", topo.rank) != topo.rank:
                warnings.warn(
                    f"Birder: state dict holds the m, b of rank {extra.get('rank')} of {saved_world} only: "
                    "every rank of this job starts from them (call consolidate_state_dict() on all "
                    "ranks before state_dict() for an exact resume)", stacklevel=2,
                )
            # Optimizer.load_state_dict casts state to the parameter dtype; keep m, b in fp32.
            index_of = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            for p in own:
                st = saved.get(index_of.get(p))
                if st is not None and "m" in st:
                    self.state[p]["m"] = st["m"].to(device=p.device, dtype=torch.float32).clone()
                    self.state[p]["b"] = st["b"].to(device=p.device, dtype=torch.float32).clone()
        for p in own:
            self.hook_state.param_state[p] = self.state[p]
        self.hook_state.invalidate_layouts()
        self.hook_state.step = int(extra.get("step", self.hook_state.step))
        # Byte counters are per rank: only a state dict saved by this very rank restores them.
        if "comm_stats" in extra and extra.get("rank") == topo.rank and extra.get("world_size") == topo.world_size:
            self.hook_state.stats.load_state_dict(extra["comm_stats"])

    def _set_flat_state(self, flat_m, flat_b):
        start = 0
        for p in self.hook_state.params:
            n = p.numel()
            self.state[p]["m"] = flat_m[start : start + n].to(p.device, torch.float32).view_as(p).clone()
            self.state[p]["b"] = flat_b[start : start + n].to(p.device, torch.float32).view_as(p).clone()
            start += n
