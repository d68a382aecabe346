"""The butterflies and sign flips of the randomized Hadamard transform, shared by the Triton kernels (no kernel here).

Contract: :func:`dist_supernet.kernels.reference.rht`. One program holds one block (``BLOCK``
float32 values, a power of two) in registers; stage h of the butterflies views it as
[BLOCK / 2h, 2, h], splits the middle axis into the pair (a, b) and joins (a + b, a - b) back in
place: the reference's float32 additions in the reference's order, so the bits agree exactly.
"""

import triton
import triton.language as tl

from dist_supernet.kernels.ops.uniform_hash import uniform_from_index


@triton.jit
def fwht(v, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform of a [BLOCK] float32 tensor (stage h = 1, 2, 4, ...)."""
    for s in tl.static_range(LOG2_BLOCK):
        pairs = tl.reshape(v, (BLOCK // (2 << s), 2, 1 << s))
        a, b = tl.split(tl.permute(pairs, (0, 2, 1)))
        v = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (BLOCK,))
    return v


@triton.jit
def flip(v, positions, rnd: tl.constexpr, seed_lo, seed_hi):
    """-v where round ``rnd`` flips the position (int64): uniform(2 position + rnd, seed) < 1/2."""
    u = uniform_from_index(positions * 2 + rnd, seed_lo, seed_hi)
    return tl.where(u < 0.5, -v, v)


@triton.jit
def rotate(v, positions, seed_lo, seed_hi, TRANSPOSE: tl.constexpr, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr):
    """H D1 H D0 v (forward) or D0 H D1 H v (transpose) for one block at int64 ``positions``."""
    if not TRANSPOSE:
        v = flip(v, positions, 0, seed_lo, seed_hi)
    v = fwht(v, BLOCK, LOG2_BLOCK)
    v = flip(v, positions, 1, seed_lo, seed_hi)
    v = fwht(v, BLOCK, LOG2_BLOCK)
    if TRANSPOSE:
        v = flip(v, positions, 0, seed_lo, seed_hi)
    return v
