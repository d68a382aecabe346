"""The two-round randomized Hadamard transform per block on CPU (numba).

Contract: :func:`dist_supernet.kernels.reference.rht`. One block (a power of two, <= 8192
float32 = 32 KiB) is copied to a scratch array that stays in L1/L2 through its log2(block)
butterfly stages. Traffic: 4 bytes read and 4 written per element.

Legend: D elements, Bk the block, NB blocks, Dp = NB Bk.
"""

import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _common, _hadamard
from dist_supernet.kernels.cpu._common import kernel


@kernel
def _rht_kernel(x, numel, block, seed_lo, seed_hi, transpose, out, lo, hi):
    v = np.empty(block, dtype=np.float32)
    for b in range(lo, hi):
        first = b * block
        n = min(block, numel - first)
        for i in range(block):
            v[i] = x[first + i] if i < n else np.float32(0.0)
        _hadamard.rotate(v, block, first, seed_lo, seed_hi, transpose)
        out[first:first + block] = v


def rht(x_D, seed, block, *, transpose=False):
    """numba twin of :func:`dist_supernet.kernels.reference.rht`: float32 [Dp].

    Example::
        >>> rht(torch.tensor([1.0, 2.0, 3.0]), seed=5, block=8).shape
        torch.Size([8])
    """
    reference.check_block(block)
    flat = x_D.reshape(-1).to(torch.float32).contiguous()
    nblocks = reference.num_blocks(flat.numel(), block)
    out = torch.empty(nblocks * block, dtype=torch.float32)
    if nblocks:
        seed_lo, seed_hi = _common.seed_halves(seed)
        _common.run_split(_rht_kernel, nblocks, _common.numpy_view(flat), flat.numel(), int(block), seed_lo, seed_hi,
                          bool(transpose), _common.numpy_view(out))
    return out
