"""One bit per rotated coordinate and one scale per block, Triton: one program per block.

Contract: :func:`dist_supernet.kernels.reference.onebit_encode`: u = H D1 H D0 x, bit = (u >= 0)
packed LSB first, scale = sum(x**2) / sum(|u|). The bits equal the reference's exactly; the
two sums are tree reductions here (compared with a tolerance). Traffic: 4 bytes read,
1/8 + 4/Bk written per element.

Legend: D elements, Bk the block, NB blocks, Dp = NB Bk.
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _hadamard, _launch
from dist_supernet.kernels.ops.rht import num_warps_for


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _onebit_encode_kernel(
    x_ptr,  # float32 [D], read
    bits_ptr,  # uint8 [Dp / 8] packed signs, written
    scales_ptr,  # float32 [NB] per-block scale, written
    numel,  # D (positions at or past it read 0)
    seed_lo,  # int32 bits of seed & 0xFFFFFFFF
    seed_hi,  # int32 bits of seed >> 32
    BLOCK: tl.constexpr,  # Bk, a power of two
    LOG2_BLOCK: tl.constexpr,  # log2(Bk)
):
    block = tl.program_id(0).to(tl.int64)
    positions = block * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + positions, mask=positions < numel, other=0.0)
    sum_sq = tl.sum(x * x, axis=0)
    u = _hadamard.rotate(x, positions, seed_lo, seed_hi, False, BLOCK, LOG2_BLOCK)
    sum_abs = tl.sum(tl.abs(u), axis=0)
    scale = tl.where(sum_abs > 0, tl.div_rn(sum_sq, tl.where(sum_abs > 0, sum_abs, 1.0)), 0.0)
    tl.store(scales_ptr + block, scale)
    signs = tl.reshape((u >= 0).to(tl.int32), (BLOCK // 8, 8))
    packed = tl.sum(signs << tl.arange(0, 8)[None, :], axis=1)
    tl.store(bits_ptr + block * (BLOCK // 8) + tl.arange(0, BLOCK // 8), packed.to(tl.uint8))


def onebit_encode(x_D, seed, block):
    """Triton twin of :func:`dist_supernet.kernels.reference.onebit_encode`: (uint8 [Dp / 8], float32 [NB]).

    Example::
        >>> bits, scales = onebit_encode(torch.tensor([1.0, -2.0, 0.5], device="cuda"), seed=3, block=8)
        >>> bits.shape, scales.shape
        (torch.Size([1]), torch.Size([1]))
    """
    log2_block = reference.check_block(block)
    flat = x_D.reshape(-1).to(torch.float32).contiguous()
    _launch.check_numel(flat.numel())
    nblocks = reference.num_blocks(flat.numel(), block)
    bits = torch.empty(nblocks * block // 8, dtype=torch.uint8, device=x_D.device)
    scales = torch.empty(nblocks, dtype=torch.float32, device=x_D.device)
    if nblocks:
        seed_lo, seed_hi = _launch.seed_halves(seed)
        _onebit_encode_kernel[(nblocks,)](flat, bits, scales, flat.numel(), seed_lo, seed_hi, BLOCK=block,
                                          LOG2_BLOCK=log2_block, num_warps=num_warps_for(block),
                                          **_launch.LAUNCH_OPTIONS)
    return bits, scales
