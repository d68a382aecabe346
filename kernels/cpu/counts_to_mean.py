"""Exact counts -> the float32 mean of +-1 on CPU (numba).

Contract: :func:`dist_supernet.kernels.reference.counts_to_mean`: mean = float32(2 count - N) / N (one rounding),
0 where the mask is False. Reads 4 bytes and writes 4 per element.

Legend: N rows the counts are over, D elements.
"""

import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _bits, _common
from dist_supernet.kernels.cpu._common import kernel


@kernel
def _counts_to_mean_kernel(counts, num_rows, mask, out, lo, hi):
    has_mask = mask.shape[0] > 0
    _bits.to_mean(counts[lo:hi], num_rows, mask[lo:hi] if has_mask else mask, has_mask, out[lo:hi])


def counts_to_mean(counts, num_rows, *, mask=None, out=None):
    """numba twin of :func:`dist_supernet.kernels.reference.counts_to_mean` for int32/int64 counts.

    Example::
        >>> counts_to_mean(torch.tensor([0, 1, 2]), 2).tolist()
        [-1.0, 0.0, 1.0]
    """
    flat = counts.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int32)
    out = reference.check_out(out, counts.shape, torch.float32, "cpu")
    if out is None:
        out = torch.empty(counts.shape, dtype=torch.float32)
    if flat.numel():
        _common.run_split(_counts_to_mean_kernel, flat.numel(), _common.numpy_view(flat.contiguous()), int(num_rows),
                          _common.optional_u8(mask, "mask"), _common.numpy_view(out.view(-1)))
    return out
