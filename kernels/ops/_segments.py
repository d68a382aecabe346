"""Per-element segment lookup and hash draw shared by the Triton kernels (jit helpers, no kernel here).

Segment lookup: a binary search over seg_starts, per element, in registers. Chosen over a
per-program segment table built by the launcher because it needs no extra launch, no table
to size or keep in sync with the block size (which autotuning changes), and no host sync;
seg_starts is tiny (P + 1 int64, P <= a few thousand per bucket), so its ceil(log2 P) loads
per element hit L1. Unmeasured on a GPU (none was available); see docs/kernels.md.
"""

import triton
import triton.language as tl


@triton.jit
def segment_of(seg_starts_ptr, j, num_segments, num_steps):
    """The last segment s with seg_starts[s] <= j (int64 tensor j): the non-empty one holding j.

    num_steps = ceil(log2(num_segments)); positions at or past D land in the last segment.
    """
    lo = tl.zeros(j.shape, dtype=tl.int64)
    hi = tl.zeros(j.shape, dtype=tl.int64) + num_segments
    for _ in range(num_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(seg_starts_ptr + mid) <= j
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def canonical_index(seg_starts_ptr, seg_canon_ptr, j, num_segments, num_steps):
    """(canon(j), s) for an int64 tensor of chunk positions j (num_segments >= 1)."""
    seg = segment_of(seg_starts_ptr, j, num_segments, num_steps)
    canon = tl.load(seg_canon_ptr + seg) + (j - tl.load(seg_starts_ptr + seg))
    return canon, seg
