"""Config schemas carried by registry entries: one dataclass per entry, ranges in each field's metadata.

A schema's fields are the keys of its config group, their annotations the types
and their defaults what a yaml may leave out. A field made with :func:`bounded`
also declares its range: ``min`` / ``max`` (inclusive) and ``choices``; a field
typed ``X | None`` accepts null as well. The training app's validator
(``dist_supernet/train/config.py``) checks keys, types and these ranges for
every schema, so a registered baseline's keys need no code there.

Example::
    >>> @dataclasses.dataclass
    ... class Knobs:
    ...     rank: int = bounded(4, min=1)            # why: ...
    ...     num_nodes: int | None = bounded(None, min=1)
    >>> range_problem(Knobs(rank=0))
    ('rank', 0, 'must be >= 1')
    >>> range_problem(Knobs(num_nodes=0))
    ('num_nodes', 0, 'must be >= 1 or null')
"""

import dataclasses
import types
import typing


def bounded(default, *, min=None, max=None, choices=None):  # noqa: A002 (the names a reader expects)
    """A dataclass field with ``default`` and a declared range (see the module docstring)."""
    metadata = {k: v for k, v in (("min", min), ("max", max), ("choices", choices)) if v is not None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _nullable(annotation) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a number", str: "a string"}


def type_problem(obj) -> tuple[str, object, str] | None:
    """The first field of ``obj`` whose value is not of its annotated scalar type: ``(key, value, reason)``.

    bool, int (not bool), float (int or float) and str are checked; null where the field is ``X | None``;
    other annotations (lists, dicts) are left to their consumers.

    Example::
        >>> @dataclasses.dataclass
        ... class Knobs:
        ...     rank: int = 4
        >>> type_problem(Knobs(rank="4"))
        ('rank', '4', 'must be an int')
    """
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value, hint = getattr(obj, field.name), hints[field.name]
        if value is None and _nullable(hint):
            continue
        wanted = [t for t in (typing.get_args(hint) if _nullable(hint) else (hint,)) if t is not type(None)]
        if len(wanted) != 1 or wanted[0] not in _TYPE_NAMES:
            continue
        kind = wanted[0]
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, str))
        if not ok:
            return field.name, value, f"must be {_TYPE_NAMES[kind]}{' or null' if _nullable(hint) else ''}"
    return None


def range_problem(obj) -> tuple[str, object, str] | None:
    """The first field of the dataclass ``obj`` outside its declared range: ``(key, value, reason)``, else None."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value, meta = getattr(obj, field.name), field.metadata
        if value is None or not meta:
            continue  # null passed the type check only where the field allows it
        or_null = " or null" if _nullable(hints[field.name]) else ""
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            return field.name, value, f"expected one of {', '.join(map(str, choices))}"
        low, high = meta.get("min"), meta.get("max")
        if low is not None and high is not None and not low <= value <= high:
            return field.name, value, f"must be in [{low}, {high}]{or_null}"
        if low is not None and value < low:
            return field.name, value, f"must be >= {low}{or_null}"
        if high is not None and value > high:
            return field.name, value, f"must be <= {high}{or_null}"
    return None
