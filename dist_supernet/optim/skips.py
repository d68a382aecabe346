"""Counters of optimizer steps skipped for a non-finite gradient: one object, one owner per run.

Whoever decides a skip records it here: :class:`~dist_supernet.optim.Birder`
(``Birder.skips``; the hook saw every rank's own gradient, so only it can
decide), or, for any other optimizer, the training app's ``NonFiniteGuard``,
which then holds its own. The guard reads and checkpoints the one in use.

Example::
    skips = SkipCounter()
    skips.skipped({"step": 3})           # a step skipped on every rank
    skips.stepped()                      # a step taken: the run of skips ends
    (skips.skipped_steps, skips.consecutive_skips)   # (1, 0)
"""


class SkipCounter:
    """Skipped steps in all, in a row, and what the recorder said about the latest one."""

    def __init__(self):
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_skip: dict | None = None  # the recorder's description of the latest skipped step

    def skipped(self, info: dict) -> None:
        """Record a step skipped on every rank; ``info`` describes it (kept as ``last_skip``)."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.last_skip = info

    def stepped(self) -> None:
        """Record a step taken: the run of consecutive skips ends."""
        self.consecutive_skips = 0

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


class ReportsSkips:
    """Read-only ``skipped_steps`` and ``consecutive_skips`` of the ``skips`` counter a class holds (Birder
    and the training app's NonFiniteGuard show the same two numbers of the one counter)."""

    skips: SkipCounter

    @property
    def skipped_steps(self) -> int:
        return self.skips.skipped_steps

    @property
    def consecutive_skips(self) -> int:
        return self.skips.consecutive_skips
