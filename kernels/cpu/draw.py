"""The counter-based draw on CPU (numba), for tests and the benchmark: see dist_supernet.kernels.reference.draw.

The hot kernels (compress, requantize) inline the draw of consecutive indices; this one takes an
index array. Legend: D indices.
"""

import numba
import numpy as np
import torch

from dist_supernet.kernels.cpu import _common
from dist_supernet.kernels.cpu._common import kernel


@kernel
def _draw_kernel(index, seed, wide, out, lo, hi):
    ids = index[lo:hi]
    draws = out[lo:hi]
    if wide:
        # 64-bit indices: the keys follow the high half (recomputed only when it changes)
        high = numba.uint64(ids[0]) >> numba.uint64(32) if hi > lo else numba.uint64(0)
        k0, k1 = _common.hash_keys(seed, high)
        for i in range(hi - lo):
            bits = numba.uint64(ids[i])
            if (bits >> numba.uint64(32)) != high:
                high = bits >> numba.uint64(32)
                k0, k1 = _common.hash_keys(seed, high)
            draws[i] = _common.draw(numba.uint32(bits & numba.uint64(0xFFFFFFFF)), k0, k1)
    else:
        k0, k1 = _common.hash_keys(seed, numba.uint64(0))
        for i in range(hi - lo):
            draws[i] = _common.draw(numba.uint32(ids[i] & 0xFFFFFFFF), k0, k1)


def draw(index, seed):
    """numba twin of :func:`dist_supernet.kernels.reference.draw` (int32 indices as uint32 bits, int64 as 64-bit).

    Example::
        >>> d = draw(torch.arange(4), 7)
        >>> bool(((d >= 0) & (d < 2**25)).all())
        True
    """
    flat = index.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int64)
    out = torch.empty(flat.numel(), dtype=torch.int32)
    if flat.numel():
        _common.run_split(_draw_kernel, flat.numel(), _common.numpy_view(flat.contiguous()), _common.seed_u64(seed),
                          flat.dtype == torch.int64, _common.numpy_view(out))
    return out.view(index.shape)
