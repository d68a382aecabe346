"""Architecture samplers: which subnets train at a given global step.

Every draw comes from a ``random.Random`` seeded by ``(seed, step, stream)``
(:func:`step_rng`), so all ranks sample the same archs without talking to each
other, a resumed run samples what the uninterrupted run would have, and a step
can be re-sampled in any order. ``state_dict()`` holds the seed and the
complexity-aware walk's position (a cache: the walk is replayable from the
seed); it goes into checkpoints.

- :class:`UniformSampler`: each gene uniform (OFA, BigNAS "random").
- :class:`SandwichSampler`: max + min + the archs of an inner sampler (BigNAS
  sandwich rule; the max arch is the in-place distillation teacher).
- :class:`ComplexityAwareSampler`: FLOPs split into ``num_bins`` equal-width
  bands; the band does a reflecting random walk (-1, 0, +1 every
  ``steps_per_move`` steps), and archs are drawn uniformly until one falls in
  the band, else steered into it gene by gene (ElasticViT: consecutive steps train subnets of similar size, which
  reduces gradient conflicts between very different subnets).

Every ``sample`` takes ``elastic`` (progressive shrinking): the dims that may
vary, the others stay at max.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping

from dist_supernet.errors import ConfigError
from dist_supernet.supernet.space import Supernet

SAMPLERS = ("uniform", "sandwich", "complexity_aware")


def step_rng(seed: int, step: int, stream: str) -> random.Random:
    """A ``random.Random`` fixed by (seed, step, stream): identical on every rank and process.

    Example::
        >>> step_rng(0, 5, "arch").random() == step_rng(0, 5, "arch").random()
        True
    """
    digest = hashlib.sha256(f"{int(seed)}/{int(step)}/{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class ArchSampler:
    """Base: ``sample(step, elastic=None) -> list[arch]``, plus checkpoint state."""

    name = ""

    def __init__(self, space: Supernet, seed: int = 0, num_archs: int = 1):
        if int(num_archs) != num_archs or num_archs < 0:
            raise ConfigError("num_archs", num_archs, "expected a non-negative integer")
        self.space = space
        self.seed = int(seed)
        self.num_archs = int(num_archs)

    def sample(self, step: int, elastic: Iterable[str] | None = None) -> list[dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"sampler state name={state.get('name')!r}: this sampler is {self.name!r}")
        self.seed = int(state["seed"])


class UniformSampler(ArchSampler):
    """``num_archs`` archs per step, each gene uniform over its choices.

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> sampler = UniformSampler(OFACNN(1, 8, 10), seed=0, num_archs=2)
        >>> sampler.sample(7) == sampler.sample(7)
        True
    """

    name = "uniform"

    def sample(self, step: int, elastic: Iterable[str] | None = None) -> list[dict]:
        rng = step_rng(self.seed, step, self.name)
        return [self.space.sample(rng, elastic) for _ in range(self.num_archs)]


class ComplexityAwareSampler(ArchSampler):
    """Archs whose FLOPs lie in a band that walks slowly over ``num_bins`` bins.

    Bins split ``[flops(min_arch), flops(max_arch)]`` of the (restricted) space
    evenly. Up to ``max_tries`` uniform draws look for an arch in the band;
    uniform genes rarely land in the extreme bins, so if none does, the
    closest draw is steered there one gene step at a time (every gene is
    monotone in FLOPs).

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> sampler = ComplexityAwareSampler(OFACNN(1, 8, 10), seed=0, num_bins=4)
        >>> [sampler.level_at(step) for step in range(6)]  # doctest: +SKIP
        [2, 3, 3, 2, 1, 1]
    """

    name = "complexity_aware"

    def __init__(
        self,
        space: Supernet,
        seed: int = 0,
        num_archs: int = 1,
        num_bins: int = 8,
        steps_per_move: int = 1,
        max_tries: int = 16,
    ):
        super().__init__(space, seed, num_archs)
        for key, value in (("num_bins", num_bins), ("steps_per_move", steps_per_move), ("max_tries", max_tries)):
            if int(value) != value or value < 1:
                raise ConfigError(key, value, "expected a positive integer")
        self.num_bins, self.steps_per_move, self.max_tries = int(num_bins), int(steps_per_move), int(max_tries)
        self._bounds: dict[frozenset, tuple[int, int]] = {}
        self._walk = (0, self._start_level())  # (move index, level) cache

    def _start_level(self) -> int:
        return step_rng(self.seed, 0, "walk-start").randrange(self.num_bins)

    def level_at(self, step: int) -> int:
        """Band index at ``step``: a reflecting walk, replayed from the seed if ``step`` went backwards."""
        move = step // self.steps_per_move
        cached_move, level = self._walk
        if move < cached_move:
            cached_move, level = 0, self._start_level()
        for m in range(cached_move + 1, move + 1):
            level += step_rng(self.seed, m, "walk").choice((-1, 0, 1))
            if self.num_bins == 1:
                level = 0
            elif level < 0:  # reflect off the edges
                level = 1
            elif level >= self.num_bins:
                level = self.num_bins - 2
        self._walk = (move, level)
        return level

    def band(self, step: int, elastic: Iterable[str] | None = None) -> tuple[float, float]:
        """FLOPs interval ``[low, high]`` of the band at ``step``."""
        dims = self.space.resolve_elastic(elastic)
        if dims not in self._bounds:
            self._bounds[dims] = (self.space.flops(self.space.min_arch(dims)), self.space.flops(self.space.max_arch()))
        low, high = self._bounds[dims]
        width = (high - low) / self.num_bins
        level = self.level_at(step)
        return low + level * width, low + (level + 1) * width

    def _gap(self, arch: dict, low: float, high: float) -> float:
        """Distance of the arch's FLOPs from the band, signed: > 0 above, < 0 below, 0 inside."""
        flops = self.space.flops(arch)
        return flops - high if flops > high else (flops - low if flops < low else 0.0)

    def _steer(self, arch: dict, low: float, high: float, rng: random.Random, dims: frozenset) -> dict:
        """Move one random gene one choice down (above the band) or up (below) until inside; best seen if never.

        Every gene is monotone in FLOPs, so this walk reaches the band from any
        start unless the band is narrower than one step.
        """
        genes = self.space.genes()
        values = self.space.arch_to_genes(arch)
        values = [rng.choice(g.choices) if v is None else v for g, v in zip(genes, values)]
        best, best_gap = arch, abs(self._gap(arch, low, high))
        for _ in range(4 * len(genes)):
            gap = self._gap(self.space.genes_to_arch(values), low, high)
            if gap == 0:
                break
            step = -1 if gap > 0 else 1
            movable = [i for i, g in enumerate(genes)
                       if g.dim in dims and 0 <= g.choices.index(values[i]) + step < len(g.choices)]
            if not movable:
                break
            i = rng.choice(movable)
            values[i] = genes[i].choices[genes[i].choices.index(values[i]) + step]
            candidate = self.space.genes_to_arch(values)
            candidate_gap = abs(self._gap(candidate, low, high))
            if candidate_gap < best_gap:
                best, best_gap = candidate, candidate_gap
        return best

    def sample(self, step: int, elastic: Iterable[str] | None = None) -> list[dict]:
        dims = self.space.resolve_elastic(elastic)
        low, high = self.band(step, dims)
        rng = step_rng(self.seed, step, self.name)
        archs = []
        for _ in range(self.num_archs):
            best, best_gap = None, float("inf")
            for _ in range(self.max_tries):
                arch = self.space.sample(rng, dims)
                gap = abs(self._gap(arch, low, high))
                if gap < best_gap:
                    best, best_gap = arch, gap
                if gap == 0:
                    break
            if best_gap > 0:
                best = self._steer(best, low, high, rng, dims)
            archs.append(best)
        return archs

    def state_dict(self) -> dict:
        return {**super().state_dict(), "walk": list(self._walk)}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        move, level = state.get("walk", (0, self._start_level()))
        self._walk = (int(move), int(level))


class SandwichSampler(ArchSampler):
    """``[max_arch, min_arch, *inner.sample(step)]``: the largest (teacher), the smallest and some in between.

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> space = OFACNN(1, 8, 10)
        >>> archs = SandwichSampler(UniformSampler(space, num_archs=2)).sample(0)
        >>> len(archs), archs[0] == space.max_arch(), archs[1] == space.min_arch()
        (4, True, True)
    """

    name = "sandwich"

    def __init__(self, random_sampler: ArchSampler):
        super().__init__(random_sampler.space, random_sampler.seed, random_sampler.num_archs + 2)
        self.random_sampler = random_sampler

    def sample(self, step: int, elastic: Iterable[str] | None = None) -> list[dict]:
        return [self.space.max_arch(), self.space.min_arch(elastic), *self.random_sampler.sample(step, elastic)]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "random_sampler": self.random_sampler.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.random_sampler.load_state_dict(state["random_sampler"])


def build_sampler(cfg: Mapping, space: Supernet, seed: int) -> ArchSampler:
    """Sampler from the ``supernet.sampler`` config group (see ``conf/supernet/*.yaml``).

    Keys: ``name`` (uniform | sandwich | complexity_aware), ``num_archs``
    (random archs per step; sandwich adds max and min), ``random`` (sandwich
    only: uniform | complexity_aware), ``num_bins``, ``steps_per_move``,
    ``max_tries`` (complexity-aware).

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> sampler = build_sampler({"name": "sandwich", "num_archs": 2}, OFACNN(1, 8, 10), seed=0)
        >>> len(sampler.sample(0))
        4
    """
    cfg = dict(cfg)
    allowed = {"name", "num_archs", "random", "num_bins", "steps_per_move", "max_tries"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(f"supernet.sampler.{unknown[0]}", cfg[unknown[0]],
                          f"unknown key; expected {', '.join(sorted(allowed))}")
    name = cfg.get("name", "sandwich")
    if name not in SAMPLERS:
        raise ConfigError("supernet.sampler.name", name, f"expected one of {', '.join(SAMPLERS)}")
    num_archs = cfg.get("num_archs", 2 if name == "sandwich" else 1)
    inner = cfg.get("random", "uniform") if name == "sandwich" else name
    if inner not in ("uniform", "complexity_aware"):
        raise ConfigError("supernet.sampler.random", inner, "expected uniform or complexity_aware")
    try:
        if inner == "uniform":
            sampler: ArchSampler = UniformSampler(space, seed, num_archs)
        else:
            ca_keys = ("num_bins", "steps_per_move", "max_tries")
            sampler = ComplexityAwareSampler(space, seed, num_archs, **{k: cfg[k] for k in ca_keys if k in cfg})
    except ConfigError as e:  # the samplers name their own arguments (num_archs): here they are config keys
        raise e.under("supernet.sampler") from None
    return SandwichSampler(sampler) if name == "sandwich" else sampler
