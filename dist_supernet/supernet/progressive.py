"""Progressive shrinking (OFA): which elastic dimensions are sampled at a given step.

Phases come from config, e.g.::

    progressive_shrinking:
      - {until_step: 100, elastic: [kernel]}
      - {until_step: 300, elastic: [kernel, depth]}
      - {until_step: null, elastic: all}

A phase is active while ``step < until_step``; the last one has
``until_step: null`` (no end). ``elastic: all`` means every dimension of the
space. Dimensions not listed stay at their largest choice; the samplers take
the returned set as their ``elastic`` argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from dist_supernet.errors import ConfigError


def check_phases(phases: Sequence[Mapping] | None, elastic_dims: Iterable[str]) -> list[dict]:
    """Validated copy of the phases list; ``ValueError`` naming the phase key for mistakes.

    ``None`` or an empty list means one phase with every dimension elastic.

    Example::
        >>> phases = check_phases([{"until_step": 10, "elastic": "kernel"}, {"until_step": None}], ["kernel", "depth"])
        >>> [(p["until_step"], sorted(p["elastic"])) for p in phases]
        [(10, ['kernel']), (None, ['depth', 'kernel'])]
    """
    all_dims = frozenset(elastic_dims)
    if not phases:
        return [{"until_step": None, "elastic": all_dims}]
    checked, previous_end = [], -1
    for i, phase in enumerate(phases):
        key = f"supernet.progressive_shrinking[{i}]"
        unknown = sorted(set(phase) - {"until_step", "elastic"})
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", phase[unknown[0]], "unknown key; expected until_step and elastic")
        until = phase.get("until_step")
        last = i == len(phases) - 1
        if until is None and not last:
            raise ConfigError(f"{key}.until_step", None, "only the last phase may be open-ended")
        if until is not None:
            if last:
                raise ConfigError(f"{key}.until_step", until, "the last phase must have until_step: null")
            if int(until) != until or until <= previous_end:
                raise ConfigError(f"{key}.until_step", until, f"expected an integer above {previous_end}")
            previous_end = int(until)
        elastic = phase.get("elastic", "all")
        dims = all_dims if elastic == "all" else frozenset([elastic] if isinstance(elastic, str) else elastic)
        unknown_dims = sorted(dims - all_dims)
        if unknown_dims:
            raise ConfigError(f"{key}.elastic", sorted(dims), f"unknown {', '.join(unknown_dims)}; expected a subset "
                              f"of {', '.join(sorted(all_dims))} or all")
        checked.append({"until_step": None if until is None else int(until), "elastic": dims})
    return checked


def elastic_at(phases: Sequence[Mapping] | None, step: int, elastic_dims: Iterable[str]) -> frozenset[str]:
    """The elastic dimensions at ``step`` (the restricted space to hand to a sampler).

    Example::
        >>> phases = [{"until_step": 100, "elastic": ["kernel"]}, {"until_step": None, "elastic": "all"}]
        >>> sorted(elastic_at(phases, 99, ["kernel", "depth"])), sorted(elastic_at(phases, 100, ["kernel", "depth"]))
        (['kernel'], ['depth', 'kernel'])
    """
    for phase in check_phases(phases, elastic_dims):
        if phase["until_step"] is None or step < phase["until_step"]:
            return phase["elastic"]
    raise AssertionError("check_phases guarantees an open-ended last phase")
