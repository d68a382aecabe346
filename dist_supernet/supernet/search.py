"""Evolutionary search for the most accurate subnet under a FLOPs and/or params limit (OFA / AttentiveNAS style).

Each generation keeps the best ``parent_ratio`` of the population as parents
and refills it with mutated parents (``mutation_ratio`` of the population;
each gene redrawn with ``mutate_prob``) and crossovers of two parents. Every
candidate is drawn until it meets the constraint, so every arch ever evaluated
(and returned) respects it.

Distributed: every rank runs the same random stream, so all build the same
candidates. With ``split_evaluation=True`` rank r scores candidates r, r+w,
... and the scores are combined with ``all_gather_object``; otherwise every
rank evaluates everything (for an evaluator that is itself data-parallel) and
rank 0's scores are broadcast. Either way all ranks hold identical scores and
take identical decisions. Without torch.distributed it runs locally.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch.distributed as dist

from dist_supernet.errors import ConfigError
from dist_supernet.supernet.space import Supernet, arch_key


@dataclass
class SearchResult:
    """Best arch found, and every distinct arch scored (for Pareto plots)."""

    best_arch: dict
    best_score: float
    history: list[float] = field(default_factory=list)  # best score so far after each generation (0: initial)
    evaluated: list[dict] = field(default_factory=list)  # {"arch", "score", "flops", "params"}, in evaluation order


class _Constraint:
    def __init__(self, space: Supernet, flops_limit: float | None, params_limit: float | None,
                 image_size: int | None):
        self.space, self.flops_limit, self.params_limit, self.image_size = space, flops_limit, params_limit, image_size

    def measure(self, arch: dict) -> tuple[int, int]:
        return self.space.flops(arch, self.image_size), self.space.params(arch)

    def __call__(self, arch: dict) -> bool:
        flops, params = self.measure(arch)
        return (self.flops_limit is None or flops <= self.flops_limit) and (
            self.params_limit is None or params <= self.params_limit
        )


class _Scores:
    """Score cache shared by construction across ranks: every rank ends each call with the same entries."""

    def __init__(self, evaluate: Callable[[dict], float], constraint: _Constraint, split: bool, group):
        self.evaluate, self.constraint, self.split, self.group = evaluate, constraint, split, group
        self.by_key: dict[str, float] = {}
        self.evaluated: list[dict] = []
        self.distributed = dist.is_available() and dist.is_initialized()

    def score(self, archs: Iterable[dict]) -> None:
        pending, seen = [], set()
        for arch in archs:
            key = arch_key(arch)
            if key not in self.by_key and key not in seen:
                pending.append(arch)
                seen.add(key)
        if not pending:
            return
        if not self.distributed:
            results = [float(self.evaluate(arch)) for arch in pending]
        elif self.split:
            rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
            mine = {i: float(self.evaluate(pending[i])) for i in range(rank, len(pending), world)}
            gathered: list = [None] * world
            dist.all_gather_object(gathered, mine, group=self.group)
            merged = {i: s for part in gathered for i, s in part.items()}
            results = [merged[i] for i in range(len(pending))]
        else:
            local = [float(self.evaluate(arch)) for arch in pending]
            box = [local]
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            dist.broadcast_object_list(box, src=src, group=self.group)
            results = box[0]
        for arch, score in zip(pending, results):
            self.by_key[arch_key(arch)] = score
            flops, params = self.constraint.measure(arch)
            self.evaluated.append({"arch": arch, "score": score, "flops": flops, "params": params})

    def __getitem__(self, arch: dict) -> float:
        return self.by_key[arch_key(arch)]

    def best(self) -> tuple[dict, float]:
        # Ties broken by the arch's key so every rank picks the same one.
        entry = max(self.evaluated, key=lambda e: (e["score"], arch_key(e["arch"])))
        return entry["arch"], entry["score"]


def _check(key: str, value, low: float, high: float | None = None, integer: bool = False) -> None:
    bad = value is None or (integer and int(value) != value) or value < low or (high is not None and value > high)
    if bad:
        kind = "an integer" if integer else "a number"
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"search.{key}", value, f"expected {kind} {bound}")


def _feasible_draw(draw: Callable[[], dict], constraint: _Constraint, max_tries: int) -> dict | None:
    for _ in range(max_tries):
        arch = draw()
        if constraint(arch):
            return arch
    return None


def _population_split(population_size, num_generations, mutate_prob, mutation_ratio, parent_ratio, max_tries):
    _check("population_size", population_size, 2, integer=True)
    _check("num_generations", num_generations, 0, integer=True)
    _check("mutate_prob", mutate_prob, 0.0, 1.0)
    _check("mutation_ratio", mutation_ratio, 0.0, 1.0)
    _check("parent_ratio", parent_ratio, 0.0, 1.0)
    _check("max_tries", max_tries, 1, integer=True)
    num_parents = max(1, int(round(parent_ratio * population_size)))
    num_mutations = int(round(mutation_ratio * population_size))
    if num_parents + num_mutations > population_size:
        raise ConfigError("search.parent_ratio", parent_ratio, f"with mutation_ratio={mutation_ratio}, more than "
                          f"the population ({num_parents} + {num_mutations} > {population_size})")
    return num_parents, num_mutations


SEARCH_SETTINGS = ("population_size", "num_generations", "mutate_prob", "mutation_ratio", "parent_ratio",
                   "max_tries", "flops_limit", "params_limit", "split_evaluation", "flops_fractions")
# ``flops_fractions`` is read by the training application (one search per FLOPs budget at each fraction of
# the way from the smallest to the largest subnet, when ``flops_limit`` is null), not by evolutionary_search.


def check_search_settings(settings: Mapping) -> dict:
    """Validate the ``supernet.search`` config group (the keyword arguments of :func:`evolutionary_search`).

    Example::
        >>> check_search_settings({"population_size": 8, "num_generations": 2})["population_size"]
        8
    """
    settings = dict(settings)
    unknown = sorted(set(settings) - set(SEARCH_SETTINGS))
    if unknown:
        raise ConfigError(f"search.{unknown[0]}", settings[unknown[0]],
                          f"unknown key; expected {', '.join(SEARCH_SETTINGS)}")
    defaults = {"population_size": 32, "num_generations": 10, "mutate_prob": 0.1, "mutation_ratio": 0.5,
                "parent_ratio": 0.25, "max_tries": 1000}
    _population_split(**{k: settings.get(k, v) for k, v in defaults.items()})
    for key in ("flops_limit", "params_limit"):
        if settings.get(key) is not None:
            _check(key, settings[key], 0)
    fractions = settings.get("flops_fractions")
    if fractions is not None and (not isinstance(fractions, (list, tuple)) or not fractions
                                  or any(not isinstance(f, (int, float)) or not 0 <= f <= 1 for f in fractions)):
        raise ConfigError("search.flops_fractions", fractions, "expected null or a non-empty list of numbers in [0, 1]")
    return settings


def check_limits(space: Supernet, flops_limit: float | None, params_limit: float | None, *,
                 elastic: Iterable[str] | None = None, image_size: int | None = None) -> dict:
    """The smallest subnet of ``space`` (``elastic`` dimensions free); ``ConfigError`` if even it exceeds a limit.

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> space = OFACNN(in_channels=1, image_size=8, num_classes=10)
        >>> check_limits(space, None, 10)
        Traceback (most recent call last):
        ...
        dist_supernet.errors.ConfigError: search.params_limit=10: even the smallest subnet has params=6230
    """
    smallest = space.min_arch(elastic)
    flops, params = _Constraint(space, flops_limit, params_limit, image_size).measure(smallest)
    if flops_limit is not None and flops > flops_limit:
        raise ConfigError("search.flops_limit", flops_limit, f"even the smallest subnet has flops={flops}")
    if params_limit is not None and params > params_limit:
        raise ConfigError("search.params_limit", params_limit, f"even the smallest subnet has params={params}")
    return smallest


def evolutionary_search(
    space: Supernet,
    evaluate: Callable[[dict], float],
    *,
    flops_limit: float | None = None,
    params_limit: float | None = None,
    image_size: int | None = None,
    population_size: int = 32,
    num_generations: int = 10,
    mutate_prob: float = 0.1,
    mutation_ratio: float = 0.5,
    parent_ratio: float = 0.25,
    max_tries: int = 1000,
    elastic: Iterable[str] | None = None,
    seed: int = 0,
    split_evaluation: bool = True,
    group: dist.ProcessGroup | None = None,
) -> SearchResult:
    """Best arch by ``evaluate(arch) -> accuracy`` among archs with flops <= flops_limit and params <= params_limit.

    ``evaluate`` must not use collectives when ``split_evaluation`` is True
    (ranks score different archs); set it False for a data-parallel evaluator.

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> space = OFACNN(in_channels=1, image_size=8, num_classes=10)
        >>> limit = space.flops(space.max_arch()) // 2
        >>> result = evolutionary_search(space, lambda a: -abs(space.flops(a) - limit), flops_limit=limit,
        ...                              population_size=8, num_generations=2)
        >>> space.flops(result.best_arch) <= limit
        True
    """
    num_parents, num_mutations = _population_split(
        population_size, num_generations, mutate_prob, mutation_ratio, parent_ratio, max_tries
    )
    constraint = _Constraint(space, flops_limit, params_limit, image_size)
    smallest = check_limits(space, flops_limit, params_limit, elastic=elastic, image_size=image_size)
    rng = random.Random(seed)
    scores = _Scores(evaluate, constraint, split_evaluation, group)

    population = []
    for _ in range(population_size):
        arch = _feasible_draw(lambda: space.sample(rng, elastic), constraint, max_tries)
        population.append(smallest if arch is None else arch)
    scores.score(population)
    history = [scores.best()[1]]

    for _ in range(num_generations):
        ranked = sorted(population, key=lambda a: (-scores[a], arch_key(a)))
        # Distinct parents: duplicates in the population would crowd out diversity.
        parents, seen = [], set()
        for arch in ranked:
            if arch_key(arch) not in seen:
                parents.append(arch)
                seen.add(arch_key(arch))
            if len(parents) == num_parents:
                break
        children = []
        for _ in range(num_mutations):
            parent = rng.choice(parents)
            child = _feasible_draw(lambda: space.mutate(parent, rng, mutate_prob, elastic), constraint, max_tries)
            children.append(parent if child is None else child)
        for _ in range(population_size - len(parents) - num_mutations):
            a, b = rng.choice(parents), rng.choice(parents)
            child = _feasible_draw(lambda: space.crossover(a, b, rng, elastic), constraint, max_tries)
            children.append(a if child is None else child)
        population = parents + children
        scores.score(children)
        history.append(scores.best()[1])

    best_arch, best_score = scores.best()
    return SearchResult(best_arch, best_score, history, scores.evaluated)


def random_search(
    space: Supernet,
    evaluate: Callable[[dict], float],
    num_samples: int,
    *,
    flops_limit: float | None = None,
    params_limit: float | None = None,
    image_size: int | None = None,
    max_tries: int = 1000,
    elastic: Iterable[str] | None = None,
    seed: int = 0,
    split_evaluation: bool = True,
    group: dist.ProcessGroup | None = None,
) -> SearchResult:
    """Baseline: best of ``num_samples`` random archs meeting the limits (same distributed contract).

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> space = OFACNN(in_channels=1, image_size=8, num_classes=10)
        >>> random_search(space, lambda a: 0.0, 4).best_score
        0.0
    """
    _check("num_samples", num_samples, 1, integer=True)
    constraint = _Constraint(space, flops_limit, params_limit, image_size)
    rng = random.Random(seed)
    scores = _Scores(evaluate, constraint, split_evaluation, group)
    archs = [_feasible_draw(lambda: space.sample(rng, elastic), constraint, max_tries) for _ in range(num_samples)]
    scores.score([a if a is not None else space.min_arch(elastic) for a in archs])
    best_arch, best_score = scores.best()
    return SearchResult(best_arch, best_score, [best_score], scores.evaluated)
