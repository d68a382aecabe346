"""The counter-based uniform draw on CPU (numba), for tests and the benchmark: see dist_supernet.kernels.reference.uniform."""

import numpy as np
import torch

from dist_supernet.kernels.cpu import _common
from dist_supernet.kernels.cpu._common import kernel


@kernel
def _uniform_kernel(index, seed_lo, seed_hi, wide, out, lo, hi):
    ids = index[lo:hi]
    us = out[lo:hi]
    if wide:
        for i in range(hi - lo):
            us[i] = _common.uniform64(np.int64(ids[i]), seed_lo, seed_hi)
    else:
        for i in range(hi - lo):
            us[i] = _common.uniform32(np.uint32(ids[i] & 0xFFFFFFFF), seed_lo, seed_hi)


def uniform(index, seed):
    """numba twin of :func:`dist_supernet.kernels.reference.uniform` (int32 indices as uint32 bits, int64 as 64-bit).

    Example::
        >>> bool((uniform(torch.arange(4), 7) < 1).all())
        True
    """
    flat = index.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int64)
    out = torch.empty(flat.numel(), dtype=torch.float32)
    if flat.numel():
        seed_lo, seed_hi = _common.seed_halves(seed)
        _common.run_split(_uniform_kernel, flat.numel(), _common.numpy_view(flat.contiguous()), seed_lo, seed_hi,
                          flat.dtype == torch.int64, _common.numpy_view(out))
    return out.view(index.shape)
