"""Pack a bool (or 0/1 uint8) vector into bits on CPU (numba); contract: dist_supernet.kernels.reference.pack_bits.

Whole groups of 8 input bytes are packed in place with one int64 multiply each; only the
last partial group goes through a zeroed scratch word (padding bits are 0).
"""

import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _common
from dist_supernet.kernels.cpu._common import kernel


@kernel
def _pack_bits_kernel(bits, out, lo, hi):
    whole = (hi - lo) // 8
    if whole:
        _common.pack8(bits[lo:lo + whole * 8].view(np.uint64), whole, out, lo // 8)
    tail = hi - lo - whole * 8
    if tail:
        scratch = np.zeros(8, dtype=np.uint8)
        scratch[:tail] = bits[lo + whole * 8:hi]
        _common.pack8(scratch.view(np.uint64), 1, out, lo // 8 + whole)


def pack_bits(bits_D):
    """numba twin of :func:`dist_supernet.kernels.reference.pack_bits` for bool or 0/1 uint8 input.

    Example::
        >>> pack_bits(torch.tensor([True, False, True])).tolist()
        [5]
    """
    if bits_D.dtype not in (torch.bool, torch.uint8):
        return reference.pack_bits(bits_D)
    numel = bits_D.numel()
    out = torch.empty(reference.num_bytes(numel), dtype=torch.uint8)
    if numel:
        flat = bits_D.reshape(-1).contiguous()
        if flat.data_ptr() % 8:  # read as uint64 words: an offset view is copied to an aligned buffer
            flat = flat.clone()
        _common.run_split(_pack_bits_kernel, numel, _common.numpy_view(flat),
                          _common.numpy_view(out))
    return out
