"""The butterflies and sign flips of the randomized Hadamard transform, shared by the numba kernels (no kernel here).

Contract: :func:`dist_supernet.kernels.reference.rht`. The float32 additions run stage by stage
(h = 1, 2, 4, ...), as in the reference, so every backend gets the same bits.
"""

import numba
import numpy as np

from dist_supernet.kernels.cpu import _common
from dist_supernet.kernels.cpu._common import helper

HALF_DRAWS = numba.int32(1 << 24)  # draw < 2**24: probability 1/2 exactly


@helper
def fwht(v, size):
    """In-place unnormalised Walsh-Hadamard transform of v[:size] (size a power of two)."""
    h = 1
    while h < size:
        for start in range(0, size, 2 * h):
            for i in range(start, start + h):
                a = v[i]
                b = v[i + h]
                v[i] = a + b
                v[i + h] = a - b
        h *= 2


@helper
def flip(v, size, first, rnd, seed):
    """v[i] = -v[i] where round ``rnd`` flips position first + i: draw(2 (first + i) + rnd, seed) < 2**24."""
    start = numba.uint64(2 * first + rnd)
    high = start >> numba.uint64(32)
    k0, k1 = _common.hash_keys(seed, high)
    for i in range(size):
        index = start + numba.uint64(2 * i)
        if (index >> numba.uint64(32)) != high:  # the keys follow the index's high half
            high = index >> numba.uint64(32)
            k0, k1 = _common.hash_keys(seed, high)
        if _common.draw(numba.uint32(index & numba.uint64(0xFFFFFFFF)), k0, k1) < HALF_DRAWS:
            v[i] = -v[i]


@helper
def rotate(v, size, first, seed, transpose):
    """H D1 H D0 v (forward) or D0 H D1 H v (transpose), in place, for the block at position ``first``."""
    if not transpose:
        flip(v, size, first, 0, seed)
    fwht(v, size)
    flip(v, size, first, 1, seed)
    fwht(v, size)
    if transpose:
        flip(v, size, first, 0, seed)
