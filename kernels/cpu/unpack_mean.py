"""N packed rows -> the float32 mean of +-1 on CPU (numba).

Contract: :func:`dist_supernet.kernels.reference.unpack_mean`: mean = float32(2 count - N) / N (one rounding),
0 where the mask is False. Reads N / 8 bytes and writes 4 per element, the counts never touching
memory (exact counts in memory: kernels/cpu/counts_to_mean.py).

Legend: N rows, B' bytes per row, D elements.
"""

import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _bits, _common
from dist_supernet.kernels.cpu._common import BLOCK, kernel
from dist_supernet.kernels.cpu.unpack_counts import check_rows


@kernel
def _unpack_mean_kernel(payload, num_rows, mask, out, lo, hi):
    has_mask = mask.shape[0] > 0
    lanes = np.zeros(BLOCK, dtype=np.uint8)
    counts = np.zeros(BLOCK, dtype=np.int32)
    block = lo
    while block < hi:
        end = min(block + BLOCK, hi)
        _bits.decode_counts(payload, False, block, end - block, lanes, counts)
        _bits.to_mean(counts, num_rows, mask[block:end] if has_mask else mask, has_mask, out[block:end])
        block = end


def unpack_mean(packed_NB, numel, *, mask=None, out=None):
    """numba twin of :func:`dist_supernet.kernels.reference.unpack_mean`: uint8 [N, B] -> float32 [numel].

    Example::
        >>> unpack_mean(torch.tensor([[5], [1]], dtype=torch.uint8), 3).tolist()
        [1.0, -1.0, 0.0]
    """
    rows = check_rows(packed_NB, numel)
    out = reference.check_out(out, (numel,), torch.float32, "cpu")
    if out is None:
        out = torch.empty(numel, dtype=torch.float32)
    if numel == 0:
        return out
    if rows.shape[0] == 0:
        raise ValueError("packed_NB has no rows: the mean of 0 rows is undefined")
    _common.run_split(_unpack_mean_kernel, numel, _common.numpy_view(rows)[np.newaxis], rows.shape[0],
                      _common.optional_u8(mask, "mask"), _common.numpy_view(out))
    return out

