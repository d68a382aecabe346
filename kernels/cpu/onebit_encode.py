"""One bit per rotated coordinate and one scale per block on CPU (numba), fused in one pass per block.

Contract: :func:`dist_supernet.kernels.reference.onebit_encode`: u = H D1 H D0 x per block, bit =
(u >= 0) packed LSB first, scale = sum(x**2) / sum(|u|). The bits equal the reference's exactly;
the scale's two sums run in element order here (the reference's torch reductions round
differently: compared with a tolerance). Traffic: 4 bytes read, 1/8 + 4/Bk written per element.

Legend: D elements, Bk the block, NB blocks, Dp = NB Bk.
"""

import numba
import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _common, _hadamard
from dist_supernet.kernels.cpu._common import kernel


@kernel
def _onebit_encode_kernel(x, numel, block, seed_lo, seed_hi, bits, scales, lo, hi):
    v = np.empty(block, dtype=np.float32)
    for b in range(lo, hi):
        first = b * block
        n = min(block, numel - first)
        sum_sq = np.float32(0.0)
        for i in range(block):
            value = x[first + i] if i < n else np.float32(0.0)
            v[i] = value
            sum_sq = np.float32(sum_sq + value * value)
        _hadamard.rotate(v, block, first, seed_lo, seed_hi, False)
        sum_abs = np.float32(0.0)
        for i in range(block):
            sum_abs = np.float32(sum_abs + abs(v[i]))
        scales[b] = np.float32(sum_sq / sum_abs) if sum_abs > np.float32(0.0) else np.float32(0.0)
        byte0 = first >> 3
        for k in range(block >> 3):
            packed = numba.uint8(0)
            for t in range(8):
                if v[8 * k + t] >= np.float32(0.0):
                    packed |= numba.uint8(1 << t)
            bits[byte0 + k] = packed


def onebit_encode(x_D, seed, block):
    """numba twin of :func:`dist_supernet.kernels.reference.onebit_encode`: (uint8 [Dp / 8], float32 [NB]).

    Example::
        >>> bits, scales = onebit_encode(torch.tensor([1.0, -2.0, 0.5]), seed=3, block=8)
        >>> bits.shape, scales.shape
        (torch.Size([1]), torch.Size([1]))
    """
    reference.check_block(block)
    flat = x_D.reshape(-1).to(torch.float32).contiguous()
    nblocks = reference.num_blocks(flat.numel(), block)
    bits = torch.empty(nblocks * block // 8, dtype=torch.uint8)
    scales = torch.empty(nblocks, dtype=torch.float32)
    if nblocks:
        seed_lo, seed_hi = _common.seed_halves(seed)
        _common.run_split(_onebit_encode_kernel, nblocks, _common.numpy_view(flat), flat.numel(), int(block),
                          seed_lo, seed_hi, _common.numpy_view(bits), _common.numpy_view(scales))
    return bits, scales
