"""Validation of model config values: ``ConfigError`` (a ValueError) naming the key and the value."""

from collections.abc import Sequence

from dist_supernet.errors import ConfigError


def positive_int_list(key: str, value) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise ConfigError(key, list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes))
                          else value, "expected a non-empty list of positive integers")
    return [int(v) for v in value]


def probability(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(key, value, "expected a number in [0, 1)")
    return float(value)


def known_keys(family: str, cfg, keys) -> None:
    """Every key of a model config is one its family reads (a typo would otherwise be ignored)."""
    unknown = [k for k in cfg if k != "name" and k not in keys]
    if unknown:
        raise ConfigError(f"model.{unknown[0]}", cfg[unknown[0]],
                          f"unknown key for {family}; expected {', '.join(sorted(keys))}")
