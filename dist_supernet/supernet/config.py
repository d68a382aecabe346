"""Validation of the ``supernet`` config group (``conf/supernet/*.yaml``) against a built supernet.

One call at start-up, so a wrong value fails with one line naming its key
instead of deep inside training::

    sampler: {name, num_archs, random, num_bins, steps_per_move, max_tries}
    distillation: {weight, temperature, start_step}
    progressive_shrinking: null | [{until_step, elastic}, ...]
    bn_recalibration: {num_batches}
    search: {population_size, num_generations, mutate_prob, mutation_ratio, parent_ratio,
             max_tries, flops_limit, params_limit, split_evaluation, flops_fractions}
    report_archs: {<name>: <arch dict>, ...}   (more subnets to score and export after training)
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from dist_supernet.errors import ConfigError
from dist_supernet.supernet.progressive import check_phases
from dist_supernet.supernet.sampler import build_sampler
from dist_supernet.supernet.search import check_limits, check_search_settings
from dist_supernet.supernet.space import Supernet

SUPERNET_KEYS = ("sampler", "distillation", "progressive_shrinking", "bn_recalibration", "search", "report_archs")


def to_plain(value):
    """OmegaConf containers (or any mapping / sequence) to plain dicts and lists, without importing omegaconf."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [to_plain(v) for v in value]
    return value


def check_supernet_config(cfg: Mapping, space: Supernet) -> dict:
    """Plain-dict copy of the supernet config with phases resolved; ``ConfigError`` naming the first bad key.

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> cfg = check_supernet_config({"sampler": {"name": "uniform"}}, OFACNN(1, 8, 10))
        >>> sorted(cfg["progressive_shrinking"][0]["elastic"])
        ['depth', 'expand', 'kernel', 'width']
    """
    cfg = to_plain(cfg)
    unknown = sorted(set(cfg) - set(SUPERNET_KEYS))
    if unknown:
        raise ConfigError(f"supernet.{unknown[0]}", cfg[unknown[0]], f"unknown key; expected {', '.join(SUPERNET_KEYS)}")
    build_sampler(cfg.get("sampler") or {}, space, seed=0)

    distill = dict(cfg.get("distillation") or {})
    extra = sorted(set(distill) - {"weight", "temperature", "start_step"})
    if extra:
        raise ConfigError(f"supernet.distillation.{extra[0]}", distill[extra[0]],
                          "unknown key; expected weight, temperature, start_step")
    weight, temperature = distill.get("weight", 1.0), distill.get("temperature", 1.0)
    if not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise ConfigError("supernet.distillation.weight", weight, "expected a number in [0, 1]")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ConfigError("supernet.distillation.temperature", temperature, "expected a positive number")
    start = distill.get("start_step", 0)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ConfigError("supernet.distillation.start_step", start, "expected a non-negative integer")

    cfg["progressive_shrinking"] = check_phases(cfg.get("progressive_shrinking"), space.elastic_dims)

    recal = dict(cfg.get("bn_recalibration") or {})
    extra = sorted(set(recal) - {"num_batches"})
    if extra:
        raise ConfigError(f"supernet.bn_recalibration.{extra[0]}", recal[extra[0]], "unknown key; expected num_batches")
    num_batches = recal.get("num_batches", 20)
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ConfigError("supernet.bn_recalibration.num_batches", num_batches, "expected a positive integer")

    cfg["report_archs"] = check_report_archs(cfg.get("report_archs"), space)

    search = cfg.get("search") or {}
    try:
        check_search_settings(search)
        # The search after training runs over the last phase's dimensions: even its smallest subnet must fit.
        check_limits(space, search.get("flops_limit"), search.get("params_limit"),
                     elastic=cfg["progressive_shrinking"][-1]["elastic"])
    except ConfigError as e:
        raise e.under("supernet") from None
    return cfg


def check_report_archs(report_archs, space: Supernet) -> dict:
    """``supernet.report_archs``: ``{name: arch}`` scored and exported beside max, min and the searched subnets.

    Names are file names (``subnets/<name>.pt``): letters, digits, ``_`` and ``-``, not ``max``, ``min`` or
    ``searched_<n>``. Each arch is checked against ``space`` now, not after training.

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> space = OFACNN(1, 8, 10)
        >>> list(check_report_archs({"smallest": space.min_arch()}, space))
        ['smallest']
    """
    if report_archs is None:
        return {}
    if not isinstance(report_archs, Mapping):
        raise ConfigError("supernet.report_archs", report_archs, "expected a mapping of names to arch dicts")
    checked = {}
    for name, arch in report_archs.items():
        key = f"supernet.report_archs.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)) or name in ("max", "min") or re.fullmatch(
                r"searched_\d+", str(name)):
            raise ConfigError("supernet.report_archs", sorted(report_archs), f"name {name!r}: expected letters, "
                              "digits, _ and -, not max, min or searched_<n> (those are reported anyway)")
        try:
            checked[str(name)] = space.validate_arch(to_plain(arch))
        except ValueError as e:
            raise ConfigError(key, to_plain(arch), str(e)) from None
    return checked
