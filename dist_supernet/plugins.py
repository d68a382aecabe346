"""Plugins: modules imported before a run reads its config, so that what they register is known everywhere.

A collective (``comm.register_collective``), a baseline compression
(``comm.register_baseline``) or a model family (``models.register_model``)
that lives outside this package is made known by importing the module that
registers it. The training application imports the modules listed in the
config's top-level ``plugins`` key before it validates anything, in every
process: the sweep's pre-check, the pre-flight, and every torchrun worker
(they all get the same overrides). The benchmarks take ``--plugins``.

Example::
    python -m dist_supernet.train plugins=[my_package.my_collective] compression.collective=mine
    torchrun --nproc_per_node=2 benchmarks/step_worker.py --plugins my_package.my_collective --methods mine

The module must be importable in every process (installed, or on ``PYTHONPATH``).
"""

import importlib

from dist_supernet.errors import ConfigError


def load_plugins(modules) -> list[str]:
    """Import each module named in ``modules`` (a list, or a comma-separated string); returns the names.

    Raises :class:`~dist_supernet.errors.ConfigError` ``plugins=[...]: cannot import <name> (<why>)``.

    Example::
        >>> load_plugins("json,os.path")
        ['json', 'os.path']
    """
    if modules is None:
        return []
    names = [m.strip() for m in modules.split(",")] if isinstance(modules, str) else list(modules)
    names = [name for name in names if name]
    for name in names:
        if not isinstance(name, str):
            raise ConfigError("plugins", names, "expected a list of module names, e.g. plugins=[my_package.my_collective]")
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError("plugins", names, f"cannot import {name} ({error})") from error
    return names
