"""The options of low-frequency synchronisation, one schema for the library and the ``sync`` config group.

:class:`DiLoCoConfig` carries each option's type, default and range
(:func:`dist_supernet.schema.bounded`); :func:`check` adds the rules that tie
options together. ``DiLoCo(...)`` and the training app's ``sync=diloco`` group
run the same checks, so a mistake is the same one line in both
(``sync.fragments=300: must be <= sync.every=100 ...`` in the app).

Example::
    >>> check(DiLoCoConfig(quantizer="birder"))
    Traceback (most recent call last):
    ...
    dist_supernet.errors.ConfigError: quantizer=birder: Birder is its own outer optimizer (m, b over pseudo-gradients, one random bit each); set outer=birder with it
"""

import dataclasses

from dist_supernet.errors import ConfigError
from dist_supernet.schema import bounded, range_problem, type_problem

OUTERS = ("nesterov", "sgd", "birder")
QUANTIZERS = ("fp32", "int4", "onebit", "birder")
MERGES = ("mix", "delta")
FORMS = ("auto", "allgather", "reduce_scatter")
BACKUP_DEVICES = ("cpu", "cuda")
MAX_OUTER_LR = 10.0  # why: an outer step scales a pseudo-gradient of H inner steps; beyond 10 it overshoots at once


@dataclasses.dataclass
class DiLoCoConfig:
    """DiLoCo / Streaming DiLoCo with a compressed pseudo-gradient exchange (see docs/diloco.md)."""

    name: str = "diloco"
    every: int = bounded(100, min=1)  # H: inner steps between two exchanges of a fragment
    fragments: int = bounded(1, min=1)  # F: pieces of the model, each exchanged at its own step offset
    outer: str = bounded("nesterov", choices=OUTERS)
    outer_lr: float = 0.7  # DiLoCo's outer Nesterov lr; Birder's outer lr is a step per coordinate
    outer_momentum: float = bounded(0.9, min=0.0, max=0.999)
    quantizer: str = bounded("onebit", choices=QUANTIZERS)
    streaming: bool = False  # fragments at offsets spread over H, exchanged on a worker thread
    delay: int | None = bounded(None, min=0)  # tau: inner steps an exchange overlaps; null: H // (2 F) streamed
    merge: str = bounded("mix", choices=MERGES)  # how an overlapped result meets the inner progress since its send
    merge_alpha: float = bounded(0.5, min=0.0, max=1.0)  # mix: theta = a theta_local + (1 - a) theta_global
    form: str = bounded("auto", choices=FORMS)  # the exchange between nodes; auto: allgather <= 2 nodes
    backup_device: str = bounded("cpu", choices=BACKUP_DEVICES)  # weights at the last sync, outer state
    birder_beta: float = bounded(0.9, min=0.0, max=0.999)  # Birder-outer's EMA factor of m and b

    def resolved_delay(self) -> int:
        """tau: 0 unless streamed; streamed and null: half the steps between two fragments' sends (>= 1)."""
        if not self.streaming:
            return 0
        if self.delay is not None:
            return self.delay
        return max(1, self.every // (2 * self.fragments))


def check(cfg: DiLoCoConfig) -> DiLoCoConfig:
    """Every range and every rule between options; ConfigError naming the first bad key. Returns ``cfg``."""
    for problem in (type_problem(cfg), range_problem(cfg)):
        if problem is not None:
            raise ConfigError(*problem)
    if not 0 < cfg.outer_lr <= MAX_OUTER_LR:
        raise ConfigError("outer_lr", cfg.outer_lr, f"must be in (0, {MAX_OUTER_LR}]")
    if cfg.fragments > cfg.every:
        raise ConfigError("fragments", cfg.fragments, f"must be <= every={cfg.every} (each fragment is sent at its "
                                                      "own step within the H steps)")
    if (cfg.quantizer == "birder") != (cfg.outer == "birder"):
        key, value = ("quantizer", cfg.quantizer) if cfg.quantizer == "birder" else ("outer", cfg.outer)
        raise ConfigError(key, value, "Birder is its own outer optimizer (m, b over pseudo-gradients, one random bit "
                                      f"each); set {'outer' if key == 'quantizer' else 'quantizer'}=birder with it")
    if not cfg.streaming and cfg.delay not in (None, 0):
        raise ConfigError("delay", cfg.delay, "overlaps exchanges with inner steps only when streaming=true")
    if cfg.resolved_delay() >= cfg.every:
        raise ConfigError("delay", cfg.delay, f"must be < every={cfg.every}: a fragment's result must be merged "
                                              "before the fragment is sent again")
    return cfg
