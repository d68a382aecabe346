"""Triton launchers, one kernel per file (``_x_kernel`` + ``x()``); imported only on demand.

Reached through the dispatch functions in :mod:`kernels`; importing any module
here needs triton (and ``TRITON_INTERPRET=1`` set first on a machine without a GPU).
"""
