"""Exact counts -> K bit planes on CPU (numba); contract: dist_supernet.kernels.reference.pack_counts.

Each block of counts is read once from memory; for every plane its bit goes to a 0/1 scratch
block that :func:`dist_supernet.kernels.cpu._common.pack8` packs. 4 bytes read and K / 8 written per element.

Legend: D elements, K planes, B = ceil(D / 8) bytes per plane.
"""

import numba
import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _common
from dist_supernet.kernels.cpu._common import BLOCK, kernel


@kernel
def _pack_counts_kernel(counts, num_planes, planes, lo, hi):
    scratch = np.zeros(BLOCK, dtype=np.uint8)
    words = scratch.view(np.uint64)
    block = lo
    while block < hi:
        end = min(block + BLOCK, hi)
        filled = end - block
        num_bytes = (filled + 7) // 8
        cs = counts[block:end]
        for plane in range(num_planes):
            bits = scratch[:filled]
            shift = cs.dtype.type(plane)  # the counts' own width: int64 shifts would widen int32 lanes
            for i in range(filled):
                bits[i] = numba.uint8((cs[i] >> shift) & 1)
            scratch[filled:num_bytes * 8] = 0
            _common.pack8(words, num_bytes, planes[plane], block // 8)
        block = end


def pack_counts(counts_D, num_planes):
    """numba twin of :func:`dist_supernet.kernels.reference.pack_counts`: int [D] -> uint8 [K, ceil(D / 8)].

    Example::
        >>> pack_counts(torch.tensor([3, 0, 2]), 2).tolist()
        [[1], [5]]
    """
    if counts_D.dtype.is_floating_point or counts_D.dtype == torch.bool:
        raise ValueError(f"counts_D dtype={counts_D.dtype}: expected an integer dtype")
    numel = counts_D.numel()
    planes = torch.zeros((num_planes, reference.num_bytes(numel)), dtype=torch.uint8)
    if numel == 0 or num_planes == 0:
        return planes
    counts = counts_D.reshape(-1)
    if counts.dtype not in (torch.int32, torch.int64):
        counts = counts.to(torch.int32)
    _common.run_split(_pack_counts_kernel, numel, _common.numpy_view(counts.contiguous()), int(num_planes),
                      _common.numpy_view(planes))
    return planes
