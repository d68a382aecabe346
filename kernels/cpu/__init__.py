"""Compiled CPU backend (numba): one kernel per file, ``_x_kernel`` + launcher ``x()``.

Each launcher has its reference's signature (:mod:`kernels.reference`) and gives the same
bits and values. Reached through the dispatch in :mod:`kernels`; importing a module here
needs numba. The jit options, the on-disk cache and the thread policy are in
:mod:`kernels.cpu._common`.
"""
