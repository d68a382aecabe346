"""The butterflies and sign flips of the randomized Hadamard transform, shared by the numba kernels (no kernel here).

Contract: :func:`dist_supernet.kernels.reference.rht`. The float32 additions run stage by stage
(h = 1, 2, 4, ...), as in the reference, so every backend gets the same bits.
"""

import numba
import numpy as np

from dist_supernet.kernels.cpu._common import helper, uniform64

HALF = np.float32(0.5)


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
def flip(v, size, first, rnd, seed_lo, seed_hi):
    """v[i] = -v[i] where round ``rnd`` flips position first + i: uniform(2 (first + i) + rnd, seed) < 1/2."""
    for i in range(size):
        if uniform64(numba.int64(2 * (first + i) + rnd), seed_lo, seed_hi) < HALF:
            v[i] = -v[i]


@helper
def rotate(v, size, first, seed_lo, seed_hi, transpose):
    """H D1 H D0 v (forward) or D0 H D1 H v (transpose), in place, for the block at position ``first``."""
    if not transpose:
        flip(v, size, first, 0, seed_lo, seed_hi)
    fwht(v, size)
    flip(v, size, first, 1, seed_lo, seed_hi)
    fwht(v, size)
    if transpose:
        flip(v, size, first, 0, seed_lo, seed_hi)
