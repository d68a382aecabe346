"""Re-quantize exact counts to 1 bit on CPU (numba): bit i = uniform(canon(first + i)) < count / N.

Contract: :func:`dist_supernet.kernels.reference.requantize`. Reads 4 (or 8) bytes of count, writes one
bit per element; the canonical index comes from the chunk's index map, one segment run at
a time (no index tensor). Positions at or past D (padding) take the last segment's indices.

Legend: C counts (chunk positions first .. first + C - 1), P segments.
"""

import numba
import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _common
from dist_supernet.kernels.cpu._common import BLOCK, helper, kernel


@helper
def _run(counts, at, numel, canon, num_rows, scratch, to, seed_lo, seed_hi):
    cs = counts[at:at + numel]
    bits = scratch[to:to + numel]
    rows = np.float32(num_rows)
    if ((canon + numel - 1) >> 32) == 0 and canon >= 0:
        lo = numba.uint32(canon)
        for i in range(numel):
            u = _common.uniform32(numba.uint32(lo + numba.uint32(i)), seed_lo, seed_hi)
            bits[i] = numba.uint8(u < np.float32(cs[i]) / rows)
    else:
        for i in range(numel):
            u = _common.uniform64(canon + i, seed_lo, seed_hi)
            bits[i] = numba.uint8(u < np.float32(cs[i]) / rows)


@kernel
def _requantize_kernel(counts, num_rows, seg_starts, seg_canon, first, seed_lo, seed_hi, out, lo, hi):
    """Counts [lo, hi) (lo a multiple of 8) of the positions first + i."""
    num_segments = seg_canon.shape[0]
    scratch = np.zeros(BLOCK, dtype=np.uint8)
    words = scratch.view(np.uint64)
    s = _common.segment_of(seg_starts, first + lo) if num_segments else 0
    block = lo
    while block < hi:
        end = min(block + BLOCK, hi)
        i = block
        while i < end:
            j = first + i
            if num_segments == 0:
                run_end, canon = end, j
            else:
                while s + 1 < num_segments and seg_starts[s + 1] <= j:
                    s += 1
                run_end = end if s + 1 == num_segments else min(end, seg_starts[s + 1] - first)
                canon = seg_canon[s] + (j - seg_starts[s])
            _run(counts, i, run_end - i, canon, num_rows, scratch, i - block, seed_lo, seed_hi)
            i = run_end
        filled = end - block
        num_bytes = (filled + 7) // 8
        scratch[filled:num_bytes * 8] = 0
        _common.pack8(words, num_bytes, out, block // 8)
        block = end


def requantize(counts_C, num_rows, seg_starts, seg_canon, first, *, seed):
    """numba twin of :func:`dist_supernet.kernels.reference.requantize`: int [C] -> uint8 [ceil(C / 8)].

    Example::
        >>> starts, canon = reference.index_map([3])
        >>> bits = requantize(torch.tensor([4, 0, 2]), 4, starts, canon, 0, seed=3)
        >>> reference.unpack_bits(bits, 3).tolist()[:2]
        [1, 0]
    """
    if num_rows <= 0:
        raise ValueError(f"num_rows={num_rows}: expected at least one counted row")
    reference.check_index_map(seg_starts, seg_canon)
    numel = counts_C.numel()
    out = torch.empty(reference.num_bytes(numel), dtype=torch.uint8)
    if numel == 0:
        return out
    counts = counts_C.reshape(-1)
    if counts.dtype not in (torch.int32, torch.int64):
        counts = counts.to(torch.int32)
    seed_lo, seed_hi = _common.seed_halves(seed)
    _common.run_split(
        _requantize_kernel, numel, _common.numpy_view(counts.contiguous()), int(num_rows),
        _common.numpy_view(seg_starts.contiguous()), _common.numpy_view(seg_canon.contiguous()), int(first),
        seed_lo, seed_hi, _common.numpy_view(out),
    )
    return out
