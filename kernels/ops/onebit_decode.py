"""The mean of N one-bit estimates that share a rotation, Triton: one program per block.

Contract: :func:`dist_supernet.kernels.reference.onebit_decode`, bit for bit: the rows' +-scale
added in row order, times fl(1 / N), then D0 H D1 H by the reference's butterflies. Traffic:
N / 8 + 4 N / Bk bytes read, 4 written per element.

Legend: N rows, D elements, Bk the block, NB blocks, Dp = NB Bk.
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _hadamard, _launch
from dist_supernet.kernels.ops.rht import num_warps_for


@triton.jit(do_not_specialize=["num_rows", "seed_lo", "seed_hi"])
def _onebit_decode_kernel(
    bits_ptr,  # uint8 [N, Dp / 8] packed signs, read
    scales_ptr,  # float32 [N, NB] per-row, per-block scales, read
    out_ptr,  # float32 [D] the mean estimate, written
    numel,  # D
    num_rows,  # N
    num_blocks,  # NB
    inv_rows,  # fl(1 / N)
    seed_lo,  # int32 bits of seed & 0xFFFFFFFF
    seed_hi,  # int32 bits of seed >> 32
    BLOCK: tl.constexpr,  # Bk, a power of two
    LOG2_BLOCK: tl.constexpr,  # log2(Bk)
):
    block = tl.program_id(0).to(tl.int64)
    positions = block * BLOCK + tl.arange(0, BLOCK)
    byte = block * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    row_bytes = num_blocks * (BLOCK // 8)
    z = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(num_rows):
        packed = tl.load(bits_ptr + row * row_bytes + byte).to(tl.int32)
        set_ = tl.reshape((packed[:, None] >> tl.arange(0, 8)[None, :]) & 1, (BLOCK,))
        c = tl.load(scales_ptr + row * num_blocks + block)
        z = z + tl.where(set_ != 0, c, -c)
    z = z * inv_rows
    v = _hadamard.rotate(z, positions, seed_lo, seed_hi, True, BLOCK, LOG2_BLOCK)
    tl.store(out_ptr + positions, v, mask=positions < numel)


def onebit_decode(bits_NB, scales_NS, numel, seed, block):
    """Triton twin of :func:`dist_supernet.kernels.reference.onebit_decode`: float32 [numel].

    Example::
        >>> bits, scales = onebit_encode(torch.tensor([4.0] + [0.0] * 7, device="cuda"), seed=1, block=8)
        >>> onebit_decode(bits.view(1, -1), scales.view(1, -1), 8, seed=1, block=8).tolist()[0]
        4.0
    """
    log2_block = reference.check_block(block)
    rows, nblocks = reference.check_onebit_rows(bits_NB, scales_NS, numel, block)
    _launch.check_numel(int(numel))
    out = torch.empty(int(numel), dtype=torch.float32, device=bits_NB.device)
    if nblocks:
        seed_lo, seed_hi = _launch.seed_halves(seed)
        _onebit_decode_kernel[(nblocks,)](
            bits_NB.contiguous(), scales_NS.to(torch.float32).contiguous(), out, int(numel), rows, nblocks,
            reference.as_float32(1.0 / rows), seed_lo, seed_hi, BLOCK=block, LOG2_BLOCK=log2_block,
            num_warps=num_warps_for(block), **_launch.LAUNCH_OPTIONS)
    return out
