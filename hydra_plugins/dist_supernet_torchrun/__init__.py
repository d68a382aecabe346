"""Hydra launcher plugin: every job of a ``--multirun`` is a torchrun job (``hydra/launcher=torchrun``).

``hydra_plugins`` is a namespace package (no ``__init__.py``) that Hydra scans
for plugins; this subpackage is found when the repository root is on
``sys.path`` (running from a checkout) or after ``pip install .``.
"""
