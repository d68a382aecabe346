"""Non-finite gradients: skip the step on every rank, count it, stop after too many in a row.

The rule, whatever the optimizer: if any rank's gradient holds NaN or Inf in
a step, every rank skips that optimizer step (parameters and optimizer state
unchanged), ``skipped_steps`` in ``metrics.jsonl`` counts it, and after
``trainer.max_consecutive_skips`` skipped steps in a row the job stops with a
:class:`NonFiniteGradientError` naming the step and the first offending
parameter (in ``named_parameters()`` order).

The counters live in one :class:`~dist_supernet.optim.skips.SkipCounter`:
Birder's own (``Birder.skips``) when the optimizer is Birder, which decides
and records the skip itself, else the guard's. The guard reads it, names the
parameter and checkpoints it.

Why every rank decides the same:

- ``Birder`` built on the DDP module (``compression=birder``): each rank only
  sees its own gradient; the optimizer OR-reduces per-parameter "non-finite"
  flags across ranks (one small all-reduce) and skips on every rank; the
  non-finite elements never entered m, b (see ``Birder(skip_nonfinite=...)``).
- any other optimizer, or Birder on an already reduced gradient: DDP's
  all-reduce (fp32, fp16, bf16, PowerSGD) has already averaged the gradient,
  and NaN/Inf survive averaging, so every rank holds the same non-finite
  gradient and a local check gives the same answer everywhere.

Example::
    guard = NonFiniteGuard(optimizer, model, max_consecutive_skips=5)
    loss.backward()
    stepped = guard.step(step=7)    # False: skipped on every rank, counted
"""

import logging

import torch

from dist_supernet.optim import Birder, SkipCounter
from dist_supernet.optim.skips import ReportsSkips

log = logging.getLogger(__name__)


class NonFiniteGradientError(RuntimeError):
    """Too many consecutive steps with a non-finite gradient; names the step and the parameter."""


class NonFiniteGuard(ReportsSkips):
    """Wraps ``optimizer.step()`` with the non-finite rule above.

    Args:
        optimizer: the training optimizer (Birder or any ``torch.optim.Optimizer``).
        module: the model whose ``named_parameters()`` name the offending parameter
            (the DDP module's ``.module``, not the DDP wrapper).
        max_consecutive_skips: stop after this many skipped steps in a row (>= 1).
        verbose: log each skip as a warning (rank 0); other ranks log it at debug.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module, *,
                 max_consecutive_skips: int, verbose: bool = True):
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips}: must be >= 1")
        self.optimizer = optimizer
        self.max_consecutive_skips = max_consecutive_skips
        self.verbose = verbose
        self.named = list(module.named_parameters())
        self.name_of = {id(p): name for name, p in self.named}
        # stats (saved in checkpoints so the counter in metrics.jsonl survives a restart): Birder counts its
        # own skips; for any other optimizer the guard decides, and counts.
        self.skips = optimizer.skips if isinstance(optimizer, Birder) else SkipCounter()
        self.last_skip = None  # {"step", "param", "num_params"} of the latest skipped step

    def step(self, step: int) -> bool:
        """``optimizer.step()`` unless the gradient is non-finite on some rank; True if it stepped.

        ``step`` is the 1-based number of the step being taken (as in metrics.jsonl).
        Raises :class:`NonFiniteGradientError` on every rank at the limit.
        """
        if isinstance(self.optimizer, Birder):
            before = self.skips.skipped_steps
            self.optimizer.step()  # collective: decides for every rank, and counts a skip
            skipped = self.skips.skipped_steps != before
            if skipped and not self.optimizer.hooked:  # local mode: .grad is the reduced gradient, still there
                bad = self._nonfinite_names()
                name, num_bad = bad[0], len(bad)
            elif skipped:  # the hook saw each rank's own gradient; the flags say which ranks
                info = self.skips.last_skip
                if info["param"] is not None:  # this rank's own gradient was non-finite
                    name = self.name_of.get(id(info["param"]), f"#{info['param_index']}")
                    num_bad = info["num_params"]
                else:
                    name, num_bad = f"(on rank(s) {info['ranks']})", "some"
        else:
            bad = self._nonfinite_names()
            skipped = bool(bad)
            if skipped:
                name, num_bad = bad[0], len(bad)
            else:
                self.optimizer.step()
        if not skipped:
            self.skips.stepped()
            return True
        self.last_skip = {"step": step, "param": name, "num_params": num_bad}
        if not isinstance(self.optimizer, Birder):  # Birder has counted it
            self.skips.skipped(self.last_skip)
        where = f"first offending parameter {name} ({num_bad} of {len(self.named)} parameters non-finite)"
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteGradientError(
                f"step {step}: non-finite gradient in {self.consecutive_skips} consecutive steps "
                f"(trainer.max_consecutive_skips={self.max_consecutive_skips}), {where}; stopping"
            )
        log.log(logging.WARNING if self.verbose else logging.DEBUG,
                "step %d: non-finite gradient on some rank, optimizer step skipped on every rank (%d in a row, "
                "%d in all); %s", step, self.consecutive_skips, self.skipped_steps, where)
        return False

    def _nonfinite_names(self) -> list[str]:
        """Names of parameters whose (already reduced) gradient holds NaN/Inf; one sync per step."""
        grads = [(name, p.grad) for name, p in self.named if p.grad is not None]
        if not grads:
            return []
        finite = torch.stack([torch.isfinite(g).all() for _, g in grads])
        if bool(finite.all()):
            return []
        return [name for (name, _), ok in zip(grads, finite.tolist()) if not ok]

    def state_dict(self) -> dict:
        return self.skips.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.skips.load_state_dict(state)
