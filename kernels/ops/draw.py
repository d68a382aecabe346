"""Counter-based draw shared by compress and requantize, plus a launcher to test it.

draw = x >> 7 with x a keyed triple32 of lo32(i): x = lo32 ^ k0; x ^= x >> 17; x *= 0xED5AD4BB;
x ^= x >> 11; x ^= k1; x *= 0xAC4C1B51; x ^= x >> 15; x *= 0x31848BAB; x ^= x >> 14 in uint32 arithmetic,
and (k0, k1) the halves of splitmix64(seed + hi32(i) * 0x9E3779B97F4A7C15) in uint64
arithmetic; see :func:`dist_supernet.kernels.reference.draw`. The keys are computed per element
here (two 64-bit multiplies; the CPU kernels compute them once per run of indices sharing a
high half): a GPU has compute to spare on these memory-bound kernels. Multiplications wrap and
``>>`` is a logical shift on unsigned lanes, as in the reference; constants that do not fit a
signed type are built as explicit unsigned scalars.
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels.ops import _launch


@triton.jit
def hash_keys(seed_lo, seed_hi, high):
    """(k0, k1) uint32 round keys for a uint64 tensor of high halves and the seed's int32 halves."""
    seed = (seed_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | seed_lo.to(tl.uint32, bitcast=True).to(tl.uint64)
    golden = tl.full((), 0x9E3779B97F4A7C15, tl.uint64)
    z = seed + high * golden + golden
    z = (z ^ (z >> 30)) * tl.full((), 0xBF58476D1CE4E5B9, tl.uint64)
    z = (z ^ (z >> 27)) * tl.full((), 0x94D049BB133111EB, tl.uint64)
    z = z ^ (z >> 31)
    return (z & 0xFFFFFFFF).to(tl.uint32), (z >> 32).to(tl.uint32)


@triton.jit
def draw_from_index(index, seed_lo, seed_hi):
    """int32 draws in [0, 2**25) for int64 canonical indices (int32: read as uint32) and int32 seed halves."""
    if index.dtype == tl.int64:
        low = (index & 0xFFFFFFFF).to(tl.uint32)
        high = ((index >> 32) & 0xFFFFFFFF).to(tl.uint64)
    else:
        low = index.to(tl.uint32, bitcast=True)
        high = tl.zeros(index.shape, dtype=tl.uint64)
    k0, k1 = hash_keys(seed_lo, seed_hi, high)
    x = low ^ k0
    x ^= x >> 17
    x *= tl.full((), 0xED5AD4BB, tl.uint32)
    x ^= x >> 11
    x ^= k1
    x *= tl.full((), 0xAC4C1B51, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), 0x31848BAB, tl.uint32)
    x ^= x >> 14
    return (x >> 7).to(tl.int32)


@triton.jit
def ratio_threshold(ratio):
    """int32 clamp(fl(1 + r), 0, 2) * 2**24 (0 for NaN): P(draw < it) = fl(1 + r) / 2 exactly."""
    one_plus = ratio + 1.0
    one_plus = tl.minimum(tl.where(one_plus > 0.0, one_plus, 0.0), 2.0)
    return (one_plus * 16777216.0).to(tl.int32)  # an integer in [0, 2**25]: exact


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _draw_kernel(
    index_ptr,  # int32 or int64 [D] canonical indices (the hash counter)
    out_ptr,  # int32 [D] draws, written
    numel,  # D
    seed_lo,  # int32 bits of seed & 0xFFFFFFFF
    seed_hi,  # int32 bits of seed >> 32
    BLOCK: tl.constexpr,  # elements per program
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    index = tl.load(index_ptr + offsets, mask=in_range, other=0)
    tl.store(out_ptr + offsets, draw_from_index(index, seed_lo, seed_hi), mask=in_range)


def draw(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Triton twin of :func:`dist_supernet.kernels.reference.draw` (used by tests and benchmarks only).

    Example::
        >>> d = draw(torch.arange(4, device="cuda"), seed=7)
        >>> bool(((d >= 0) & (d < 2**25)).all())
        True
    """
    numel = index.numel()
    _launch.check_numel(numel)
    out = torch.empty(index.shape, dtype=torch.int32, device=index.device)
    if numel == 0:
        return out
    flat = index.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int64)
    seed_lo, seed_hi = _launch.seed_halves(seed)
    block = _launch.DEFAULT_BLOCK_BYTES * 8  # not tuned: test helper, not on the hot path
    _draw_kernel[(triton.cdiv(numel, block),)](
        flat.contiguous(), out, numel, seed_lo, seed_hi, BLOCK=block, **_launch.LAUNCH_OPTIONS
    )
    return out
