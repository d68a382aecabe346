"""N packed rows -> exact int32 counts on CPU (numba); contract: dist_supernet.kernels.reference.unpack_counts.

Reads N / 8 bytes and writes 4 per element; the popcount of bit j over the rows is done
eight lanes per uint64 add (see :mod:`dist_supernet.kernels.cpu._bits`).

Legend: N rows, B' bytes per row (B' >= ceil(D / 8)), D elements.
"""

import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _bits, _common
from dist_supernet.kernels.cpu._common import BLOCK, kernel


@kernel
def _unpack_counts_kernel(payload, weighted, out, lo, hi):
    """out[lo:hi] = counts (lo a multiple of 8; one row of payload holds all of [lo, hi))."""
    lanes = np.zeros(BLOCK, dtype=np.uint8)
    block = lo
    while block < hi:
        end = min(block + BLOCK, hi)
        _bits.decode_counts(payload, weighted, block, end - block, lanes, out[block:end])
        block = end


def check_rows(packed_NB: torch.Tensor, numel: int) -> torch.Tensor:
    if packed_NB.dim() != 2 or packed_NB.dtype != torch.uint8:
        raise ValueError(f"packed_NB: expected uint8 [N, B], got {packed_NB.dtype} {list(packed_NB.shape)}")
    if packed_NB.shape[1] * 8 < numel:
        raise ValueError(f"packed_NB has {packed_NB.shape[1]} bytes per row, too few for numel={numel}")
    return packed_NB.contiguous()


def unpack_counts(packed_NB, numel, *, out=None):
    """numba twin of :func:`dist_supernet.kernels.reference.unpack_counts`: uint8 [N, B] -> int32 [numel].

    Example::
        >>> unpack_counts(torch.tensor([[5], [1]], dtype=torch.uint8), 3).tolist()
        [2, 0, 1]
    """
    rows = check_rows(packed_NB, numel)
    out = reference.check_out(out, (numel,), torch.int32, "cpu")
    if out is None:
        out = torch.empty(numel, dtype=torch.int32)
    if numel and rows.shape[0] == 0:
        out.zero_()
    elif numel:
        _common.run_split(_unpack_counts_kernel, numel, _common.numpy_view(rows)[np.newaxis], False,
                          _common.numpy_view(out))
    return out
