"""The two-round randomized Hadamard transform per block, Triton: one program per block.

Contract: :func:`dist_supernet.kernels.reference.rht` (the same float32 values). The block is
the tile: BLOCK is the caller's block size, not a tuning knob, and num_warps follows it
(unmeasured on a GPU: 4 warps up to 1024 elements, 8 beyond). Traffic: 4 bytes read and
4 written per element.

Legend: D elements, Bk the block, NB blocks, Dp = NB Bk.
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _hadamard, _launch


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _rht_kernel(
    x_ptr,  # float32 [D], read
    out_ptr,  # float32 [Dp], written
    numel,  # D (positions at or past it read 0)
    seed_lo,  # int32 bits of seed & 0xFFFFFFFF
    seed_hi,  # int32 bits of seed >> 32
    TRANSPOSE: tl.constexpr,  # D0 H D1 H instead of H D1 H D0
    BLOCK: tl.constexpr,  # Bk, a power of two
    LOG2_BLOCK: tl.constexpr,  # log2(Bk)
):
    positions = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + positions, mask=positions < numel, other=0.0)
    v = _hadamard.rotate(v, positions, seed_lo, seed_hi, TRANSPOSE, BLOCK, LOG2_BLOCK)
    tl.store(out_ptr + positions, v)


def num_warps_for(block: int) -> int:
    """Warps per program for a block (unmeasured on a GPU, see the module docstring)."""
    return 4 if block <= 1024 else 8


def rht(x_D, seed, block, *, transpose=False):
    """Triton twin of :func:`dist_supernet.kernels.reference.rht`: float32 [Dp].

    Example::
        >>> rht(torch.tensor([1.0, 2.0, 3.0], device="cuda"), seed=5, block=8).shape
        torch.Size([8])
    """
    log2_block = reference.check_block(block)
    flat = x_D.reshape(-1).to(torch.float32).contiguous()
    _launch.check_numel(flat.numel())
    nblocks = reference.num_blocks(flat.numel(), block)
    out = torch.empty(nblocks * block, dtype=torch.float32, device=x_D.device)
    if nblocks:
        seed_lo, seed_hi = _launch.seed_halves(seed)
        _rht_kernel[(nblocks,)](flat, out, flat.numel(), seed_lo, seed_hi, TRANSPOSE=bool(transpose), BLOCK=block,
                                LOG2_BLOCK=log2_block, num_warps=num_warps_for(block), **_launch.LAUNCH_OPTIONS)
    return out
