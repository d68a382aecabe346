"""The one registration rule of comm's extension points (collectives, baselines): no torch here.

Example::
    >>> class Base: name = "base"
    >>> class Mine(Base): name = "mine"
    >>> table = {}
    >>> add_entry(table, Mine, base=Base, key="collective name", what="collective", reserved=("auto",))
    >>> sorted(table)
    ['mine']
"""


def add_entry(registry: dict, cls, *, base: type, key: str, what: str, reserved: tuple = (), check=None) -> None:
    """``registry[cls.name] = cls`` after the checks every extension point shares.

    ``cls`` must subclass ``base``; its name must be an identifier other than ``base.name`` and
    ``reserved``; ``check(cls)``, if given, may raise for the entry's own rules; a name already taken
    by another class (by module and qualified name: re-importing the same module re-registers it
    harmlessly) is refused. ``key`` names the config key in errors, ``what`` the kind of entry.
    """
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"registering {cls!r} as a {what}: expected a subclass of {base.__name__}")
    name = cls.name
    taken = (*reserved, base.name)
    if not isinstance(name, str) or not name.isidentifier() or name in taken:
        raise ValueError(f"{key}={name!r}: a {what} name must be an identifier other than "
                         f"{' and '.join(map(repr, taken))}")
    if check is not None:
        check(cls)
    known = registry.get(name)
    if known is not None and f"{known.__module__}.{known.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
        raise ValueError(f"{key}={name!r}: already registered by {known.__module__}.{known.__qualname__}")
    registry[name] = cls
