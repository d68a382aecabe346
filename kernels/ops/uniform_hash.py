"""Counter-based uniform draw shared by compress and requantize, plus a launcher to test it.

u = (h >> 8) / 2**24 with h = lowbias32(lowbias32(lo32(i) ^ seed_lo) ^ seed_hi), then
h = lowbias32(h ^ hi32(i)) where hi32(i) != 0, in uint32 arithmetic; see
:func:`dist_supernet.kernels.reference.uniform`. Everything is done on uint32 lanes: multiplications wrap
modulo 2**32 and ``>>`` is a logical shift, as in the reference. 0x846CA68B does not fit in
int32, so both multipliers are built as explicit uint32 scalars.
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels.ops import _launch


@triton.jit
def lowbias32(x):
    """Chris Wellons' lowbias32 finaliser on a uint32 tensor."""
    x ^= x >> 16
    x *= tl.full((), 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), 0x846CA68B, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def uniform_from_index(index, seed_lo, seed_hi):
    """fp32 uniform in [0, 1) for int64 canonical indices (int32: read as uint32) and int32 seed halves."""
    if index.dtype == tl.int64:
        low = (index & 0xFFFFFFFF).to(tl.uint32)
        high = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
    else:
        low = index.to(tl.uint32, bitcast=True)
        high = tl.zeros(index.shape, dtype=tl.uint32)
    h = lowbias32(low ^ seed_lo.to(tl.uint32, bitcast=True))
    h = lowbias32(h ^ seed_hi.to(tl.uint32, bitcast=True))
    h = tl.where(high != 0, lowbias32(h ^ high), h)
    # 2**-24 is exact in fp32, and so is every k / 2**24 for a 24-bit k
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _uniform_hash_kernel(
    index_ptr,  # int32 or int64 [D] canonical indices (the hash counter)
    out_ptr,  # float32 [D] uniforms, written
    numel,  # D
    seed_lo,  # int32 bits of seed & 0xFFFFFFFF
    seed_hi,  # int32 bits of seed >> 32
    BLOCK: tl.constexpr,  # elements per program
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    index = tl.load(index_ptr + offsets, mask=in_range, other=0)
    tl.store(out_ptr + offsets, uniform_from_index(index, seed_lo, seed_hi), mask=in_range)


def uniform_hash(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Triton twin of :func:`dist_supernet.kernels.reference.uniform` (used by tests and benchmarks only).

    Example::
        >>> u = uniform_hash(torch.arange(4, device="cuda"), seed=7)
        >>> bool(((u >= 0) & (u < 1)).all())
        True
    """
    numel = index.numel()
    _launch.check_numel(numel)
    out = torch.empty(index.shape, dtype=torch.float32, device=index.device)
    if numel == 0:
        return out
    flat = index.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int64)
    seed_lo, seed_hi = _launch.seed_halves(seed)
    block = _launch.DEFAULT_BLOCK_BYTES * 8  # not tuned: test helper, not on the hot path
    _uniform_hash_kernel[(triton.cdiv(numel, block),)](
        flat.contiguous(), out, numel, seed_lo, seed_hi, BLOCK=block, **_launch.LAUNCH_OPTIONS
    )
    return out
