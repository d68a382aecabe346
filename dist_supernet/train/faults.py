"""Fault injection for reliability tests. Never set these knobs in a real run.

- ``trainer.crash_at_step`` (in the trainer): the last rank exits once, on
  torchrun's first attempt, before that step.
- ``trainer.inject_nan_at_steps``: in each listed (1-based) step the LAST rank's
  gradient of the model's LAST parameter (``named_parameters()`` order) gets a
  NaN in its first element, before DDP reduces it; the other ranks' gradients
  stay finite. Applies on every torchrun attempt (a bad batch is bad again
  after a restart). The last parameter is chosen so that the error message's
  parameter name is checked through the index-to-name mapping, not by luck.
- ``trainer.inject_divergence_at_step``: right after that step's update the LAST
  rank adds 1e-4 to the first element of the model's LAST parameter (every
  attempt): replicas that differ in one element, which
  :class:`~dist_supernet.train.replicas.ReplicaCheck` must catch. Not one ulp:
  the next identical update can round a one-ulp difference away (seen once).

And the other direction, :func:`runtime_fault_message`: the one line the
entry point prints for a fault that stops training (a collective that timed
out on a stopped or dead peer, too many non-finite steps).

Example::
    injector = NanInjector(model, rank=1, world_size=2, steps=[3, 6])
    injector.arm(step=3)      # before the step's backward
"""

import logging
import re

import torch

from dist_supernet.train.nonfinite import NonFiniteGradientError
from dist_supernet.train.replicas import ReplicaDivergenceError

log = logging.getLogger(__name__)


class NanInjector:
    """A gradient hook on one parameter that writes a NaN in the armed steps, on the last rank only."""

    def __init__(self, module: torch.nn.Module, *, rank: int, world_size: int, steps):
        self.steps = frozenset(int(s) for s in steps)
        self.armed = False
        self.handle = None
        if not self.steps or rank != world_size - 1:
            return
        self.param_name, param = list(module.named_parameters())[-1]
        self.handle = param.register_hook(self._poison)

    def arm(self, step: int) -> None:
        """Poison the gradients of ``step`` (1-based) if it is listed."""
        self.armed = self.handle is not None and step in self.steps
        if self.armed:
            log.warning("trainer.inject_nan_at_steps: NaN in the gradient of %s at step %d on this rank",
                        self.param_name, step)

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.armed:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad


class DivergenceInjector:
    """After the update of one step, the last rank adds 1e-4 to the first element of the last parameter."""

    def __init__(self, module: torch.nn.Module, *, rank: int, world_size: int, step: int | None):
        self.step = step if rank == world_size - 1 else None
        self.param_name, self.param = list(module.named_parameters())[-1]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if step != self.step:
            return
        self.param.view(-1)[:1].add_(1e-4)
        log.warning("trainer.inject_divergence_at_step: %s moved by 1e-4 after step %d on this rank",
                    self.param_name, step)


# CollectiveError's text, also when DDP re-raises it from the comm hook's future as
# "Unable to cast <text> to Tensor".
_COLLECTIVE = re.compile(r"(\S+ collective failed in stage '[^']*' \([\w-]+\) on rank \d+ of \d+: .*?)(?: to Tensor)?$")


def runtime_fault_message(error: BaseException) -> str | None:
    """One line for a known fault that stopped training (None for anything else: a bug keeps its traceback)."""
    from dist_supernet.train.checkpoint import CheckpointWriteError

    if isinstance(error, (NonFiniteGradientError, ReplicaDivergenceError, CheckpointWriteError)):
        return str(error)
    text = " ".join(str(error).split()).split(" At: ")[0]  # torch appends the Python stack of a failed callback
    found = _COLLECTIVE.search(text)
    return found.group(1) if found else None
