"""The mean of N one-bit estimates that share a rotation, on CPU (numba): weighted signs, then D0 H D1 H.

Contract: :func:`dist_supernet.kernels.reference.onebit_decode`, bit for bit: per element the rows'
+-scale are added in row order, the sum is multiplied by fl(1 / N), and the transposed rotation
runs the reference's butterflies. Traffic: N / 8 + 4 N / Bk bytes read, 4 written per element.

Legend: N rows, D elements, Bk the block, NB blocks, Dp = NB Bk.
"""

import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _common, _hadamard
from dist_supernet.kernels.cpu._common import kernel


@kernel
def _onebit_decode_kernel(bits, scales, numel, block, inv_rows, seed_lo, seed_hi, out, lo, hi):
    rows = bits.shape[0]
    v = np.empty(block, dtype=np.float32)
    for b in range(lo, hi):
        first = b * block
        for i in range(block):
            v[i] = np.float32(0.0)
        byte0 = first >> 3
        for r in range(rows):
            c = scales[r, b]
            for k in range(block >> 3):
                packed = bits[r, byte0 + k]
                for t in range(8):
                    if (packed >> t) & 1:
                        v[8 * k + t] += c
                    else:
                        v[8 * k + t] -= c
        for i in range(block):
            v[i] = v[i] * inv_rows
        _hadamard.rotate(v, block, first, seed_lo, seed_hi, True)
        n = min(block, numel - first)
        out[first:first + n] = v[:n]


def onebit_decode(bits_NB, scales_NS, numel, seed, block):
    """numba twin of :func:`dist_supernet.kernels.reference.onebit_decode`: float32 [numel].

    Example::
        >>> bits, scales = kernels.onebit_encode(torch.tensor([4.0] + [0.0] * 7), seed=1, block=8)
        >>> onebit_decode(bits.view(1, -1), scales.view(1, -1), 8, seed=1, block=8).tolist()[0]
        4.0
    """
    rows, nblocks = reference.check_onebit_rows(bits_NB, scales_NS, numel, block)
    out = torch.empty(int(numel), dtype=torch.float32)
    if nblocks:
        seed_lo, seed_hi = _common.seed_halves(seed)
        inv_rows = np.float32(reference.as_float32(1.0 / rows))
        _common.run_split(_onebit_decode_kernel, nblocks, _common.numpy_view(bits_NB.contiguous()),
                          _common.numpy_view(scales_NS.to(torch.float32).contiguous()), int(numel), int(block),
                          inv_rows, seed_lo, seed_hi, _common.numpy_view(out))
    return out
