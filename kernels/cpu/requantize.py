"""Re-quantize exact counts to 1 bit on CPU (numba): bit i = draw(canon(first + i)) * N < count * 2**25.

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


SMALL_ROWS = 63  # draw * N < 2**31 and count * 2**25 < 2**31: the comparison fits int32 lanes


@helper
def _loop(cs, bits, numel, lo, k0, k1, num_rows, small):
    """numel counts whose canonical indices share their high half (low half lo + i, keys k0, k1).

    small (a constant at each call site): N <= SMALL_ROWS, so the exact integer comparison runs
    on int32 lanes (8 per AVX2 register); otherwise on int64 lanes.
    """
    if small:
        rows = numba.int32(num_rows)
        for i in range(numel):
            count = numba.int32(min(max(cs[i], 0), num_rows))  # clamped in the counts' own width
            x = _common.draw(numba.uint32(lo + numba.uint32(i)), k0, k1)
            bits[i] = numba.uint8(numba.int32(x * rows) < numba.int32(count << numba.int32(25)))
    else:
        for i in range(numel):
            count = min(max(np.int64(cs[i]), np.int64(0)), num_rows)
            x = _common.draw(numba.uint32(lo + numba.uint32(i)), k0, k1)
            bits[i] = numba.uint8(np.int64(x) * num_rows < (count << np.int64(25)))


@helper
def _run(counts, at, numel, canon, num_rows, scratch, to, seed):
    """Counts [at, at + numel) at canonical indices canon ..: split where the high half changes."""
    while numel > 0:
        low = canon & 0xFFFFFFFF
        count = min(numel, (1 << 32) - low)
        k0, k1 = _common.hash_keys(seed, numba.uint64(canon) >> numba.uint64(32))
        cs = counts[at:at + count]
        bits = scratch[to:to + count]
        if num_rows <= SMALL_ROWS:
            _loop(cs, bits, count, numba.uint32(low), k0, k1, num_rows, True)
        else:
            _loop(cs, bits, count, numba.uint32(low), k0, k1, num_rows, False)
        at += count
        to += count
        canon += count
        numel -= count


@kernel
def _requantize_kernel(counts, num_rows, seg_starts, seg_canon, first, seed, out, lo, hi):
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
            _run(counts, i, run_end - i, canon, num_rows, scratch, i - block, seed)
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
    reference.check_rows(num_rows)
    reference.check_index_map(seg_starts, seg_canon)
    numel = counts_C.numel()
    out = torch.empty(reference.num_bytes(numel), dtype=torch.uint8)
    if numel == 0:
        return out
    counts = counts_C.reshape(-1)
    if counts.dtype not in (torch.int32, torch.int64):
        counts = counts.to(torch.int32)
    _common.run_split(
        _requantize_kernel, numel, _common.numpy_view(counts.contiguous()), int(num_rows),
        _common.numpy_view(seg_starts.contiguous()), _common.numpy_view(seg_canon.contiguous()), int(first),
        _common.seed_u64(seed), _common.numpy_view(out),
    )
    return out
