"""K bit planes -> exact int32 counts on CPU (numba); contract: dist_supernet.kernels.reference.unpack_planes.

Planes may carry leading batch dims ([..., K, B]); each batch entry is decoded on its own,
planes 0..7 summed with their weights in uint64 byte lanes (see :mod:`dist_supernet.kernels.cpu._bits`).
K / 8 bytes read and 4 written per element.

Legend: M batch entries, K planes, B bytes per plane (B >= ceil(D / 8)), D elements.
"""

import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _bits, _common
from dist_supernet.kernels.cpu._common import BLOCK, kernel


@kernel
def _unpack_planes_kernel(planes, out, lo, hi):
    """planes uint8 [M, K, B] -> out int32 [M, D]; elements [lo, hi) of every batch entry."""
    lanes = np.zeros(BLOCK, dtype=np.uint8)
    for batch in range(planes.shape[0]):
        one = planes[batch:batch + 1]
        row = out[batch]
        block = lo
        while block < hi:
            end = min(block + BLOCK, hi)
            _bits.decode_counts(one, True, block, end - block, lanes, row[block:end])
            block = end


def unpack_planes(planes_KB, numel, *, out=None):
    """numba twin of :func:`dist_supernet.kernels.reference.unpack_planes`: uint8 [..., K, B] -> int32 [..., numel].

    Example::
        >>> unpack_planes(torch.tensor([[1], [5]], dtype=torch.uint8), 3).tolist()
        [3, 0, 2]
    """
    if planes_KB.dim() < 2 or planes_KB.dtype != torch.uint8:
        raise ValueError(f"planes_KB: expected uint8 [..., K, B], got {planes_KB.dtype} {list(planes_KB.shape)}")
    *batch_shape, num_planes, row_bytes = planes_KB.shape
    if row_bytes * 8 < numel:
        raise ValueError(f"planes_KB has {row_bytes} bytes per plane, too few for numel={numel}")
    out = reference.check_out(out, (*batch_shape, numel), torch.int32, "cpu")
    if out is None:
        out = torch.empty((*batch_shape, numel), dtype=torch.int32)
    if out.numel() == 0 or num_planes == 0:
        return out.zero_()
    planes = planes_KB.reshape(-1, num_planes, row_bytes).contiguous()
    _common.run_split(_unpack_planes_kernel, numel, _common.numpy_view(planes),
                      _common.numpy_view(out.view(-1, numel)))
    return out
