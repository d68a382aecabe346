"""Fused Birder compress on CPU (numba): one pass over a chunk, m and b at canonical offsets.

Contract: :func:`dist_supernet.kernels.reference.compress`. Per element it reads g (4 B), m and b (8 B),
writes m and b (8 B) and one bit; the mask (1 B) only when given. No index is read: within a
segment g is contiguous in the chunk and m, b, mask are contiguous at canonical offsets, so
the loop over a segment's elements is a plain vectorisable loop. The bits go as 0/1 bytes to
a scratch block of BLOCK elements that :func:`pack8` packs, one int64 multiply per byte.

Legend: D elements in the chunk, P segments, T elements of the canonical state.
"""

import numba
import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _common
from dist_supernet.kernels.cpu._common import BLOCK, helper, kernel

INF = np.float32(np.inf)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)
HALF = np.float32(0.5)


def _make_run(rms):
    """The per-segment loop of one update rule; ``rms`` is a constant of the compiled code (no branch per
    element: a per-element branch on it cost the paper's rule 17% of its speed)."""

    @helper
    def _run(g, m, b, mask, has_mask, amsgrad, j, numel, state, canon, scratch, at, beta, one_minus_beta,
             seed_lo, seed_hi, beta2, one_minus_beta2, scale):
        """numel elements of one segment: chunk position j, state offset state, canonical index canon.

        Written for LLVM's loop vectoriser: slices first (so no negative-index wraparound per
        access), non-short-circuit & and |, selects instead of branches, the loop-invariant cases
        (mask, canonical indices past 2**32) as separate loops.
        """
        gs = g[j:j + numel]
        ms = m[state:state + numel]
        bs = b[state:state + numel]
        bits = scratch[at:at + numel]
        lo = numba.uint32(canon & 0xFFFFFFFF)
        wide = ((canon + numel - 1) >> 32) != 0  # some hi32 != 0: the draw needs its third round
        bad = 0
        if has_mask and not wide:
            masks = mask[state:state + numel]
            for i in range(numel):
                gv = gs[i]
                finite = abs(gv) < INF  # False for inf and NaN
                active = masks[i] != 0
                update = finite & active
                bad |= active & ~finite
                mv, bv = _step(ms[i], bs[i], gv, update, amsgrad, beta, one_minus_beta, beta2, one_minus_beta2)
                ms[i] = mv
                bs[i] = bv
                u = _common.uniform32(numba.uint32(lo + numba.uint32(i)), seed_lo, seed_hi)
                bits[i] = numba.uint8(update & (u < _probability(mv, bv, scale)))
        elif not wide:
            for i in range(numel):
                gv = gs[i]
                finite = abs(gv) < INF
                bad |= ~finite
                mv, bv = _step(ms[i], bs[i], gv, finite, amsgrad, beta, one_minus_beta, beta2, one_minus_beta2)
                ms[i] = mv
                bs[i] = bv
                u = _common.uniform32(numba.uint32(lo + numba.uint32(i)), seed_lo, seed_hi)
                bits[i] = numba.uint8(finite & (u < _probability(mv, bv, scale)))
        else:
            for i in range(numel):
                gv = gs[i]
                finite = abs(gv) < INF
                active = True
                if has_mask:
                    active = mask[state + i] != 0
                update = finite & active
                bad |= active & ~finite
                mv, bv = _step(ms[i], bs[i], gv, update, amsgrad, beta, one_minus_beta, beta2, one_minus_beta2)
                ms[i] = mv
                bs[i] = bv
                u = _common.uniform64(canon + i, seed_lo, seed_hi)
                bits[i] = numba.uint8(update & (u < _probability(mv, bv, scale)))
        return bad


    @helper
    def _step(mv, bv, gv, update, amsgrad, beta, one_minus_beta, beta2, one_minus_beta2):
        """(m, b) after one step where update, else unchanged: each product rounded, then the sum."""
        m_new = beta * mv + one_minus_beta * gv
        b_new = beta2 * bv + one_minus_beta2 * ((gv * gv) if rms else abs(gv))
        if amsgrad:
            b_new = max(b_new, bv)
        return (m_new if update else mv), (b_new if update else bv)

    @helper
    def _probability(mv, bv, scale):
        """(1 + r) / 2 with r = (m scale) / b (/ sqrt(b) when rms), r = 0 where b <= 0."""
        ratio = ZERO if bv <= ZERO else (mv * scale) / (np.sqrt(bv) if rms else bv)
        return (ONE + ratio) * HALF

    return _run


_run_abs = _make_run(False)
_run_rms = _make_run(True)


@kernel
def _compress_kernel(g, m, b, seg_starts, seg_canon, mask, used, state_offset, beta, one_minus_beta,
                     seed_lo, seed_hi, amsgrad, beta2, one_minus_beta2, rms, scale, out, lo, hi):
    """Chunk positions [lo, hi) (lo a multiple of 8); returns 1 if an active g was not finite."""
    has_mask = mask.shape[0] > 0
    has_used = used.shape[0] > 0
    scratch = np.zeros(BLOCK, dtype=np.uint8)
    words = scratch.view(np.uint64)
    bad = 0
    s = _common.segment_of(seg_starts, lo)
    block = lo
    while block < hi:
        end = min(block + BLOCK, hi)
        j = block
        while j < end:
            while seg_starts[s + 1] <= j:
                s += 1
            run_end = min(seg_starts[s + 1], end)
            canon = seg_canon[s] + (j - seg_starts[s])
            if has_used and used[s] == 0:
                scratch[j - block:run_end - block] = 0
            else:
                args_state, args_at = canon - state_offset, j - block
                if rms:
                    bad |= _run_rms(g, m, b, mask, has_mask, amsgrad, j, run_end - j, args_state, canon, scratch,
                                    args_at, beta, one_minus_beta, seed_lo, seed_hi, beta2, one_minus_beta2, scale)
                else:
                    bad |= _run_abs(g, m, b, mask, has_mask, amsgrad, j, run_end - j, args_state, canon, scratch,
                                    args_at, beta, one_minus_beta, seed_lo, seed_hi, beta2, one_minus_beta2, scale)
            j = run_end
        filled = end - block
        num_bytes = (filled + 7) // 8
        scratch[filled:num_bytes * 8] = 0  # padding bits past D are 0
        _common.pack8(words, num_bytes, out, block // 8)
        block = end
    return bad


def compress(g_D, m_T, b_T, seg_starts, seg_canon, *, beta, seed, mask_T=None, used_P=None, amsgrad=False,
             flag=None, state_offset=0, beta2=None, rms=False, ratio_scale=1.0, g_scale=1.0):
    """numba twin of :func:`dist_supernet.kernels.reference.compress` (same bits, same m and b).

    m_T, b_T: contiguous fp32 CPU tensors. bf16/fp16 g is converted to fp32 by torch first
    (exact; the fast path reads fp32 g).

    Example::
        >>> g = torch.tensor([1.0, -2.0, 0.0]); m = torch.zeros(3); b = torch.zeros(3)
        >>> starts, canon = reference.index_map([3])
        >>> bits = compress(g, m, b, starts, canon, beta=0.9, seed=0)
        >>> reference.unpack_bits(bits, 3).tolist()[:2]
        [1, 0]
    """
    reference.check_index_map(seg_starts, seg_canon)
    for name, state in (("m_T", m_T), ("b_T", b_T)):
        if state.dtype != torch.float32 or not state.is_contiguous():
            raise ValueError(f"{name} dtype={state.dtype} contiguous={state.is_contiguous()}: "
                             "Birder state is a contiguous float32 tensor (updated in place)")
    numel = g_D.numel()
    out = torch.empty(reference.num_bytes(numel), dtype=torch.uint8)
    if numel == 0:
        return out
    g = g_D.reshape(-1)
    if g.dtype != torch.float32:
        g = g.to(torch.float32)
    seed_lo, seed_hi = _common.seed_halves(seed)
    beta2 = beta if beta2 is None else beta2
    beta_f, omb_f, beta2_f, omb2_f = reference.rule_constants(beta, beta2, rms, g_scale)
    starts, canon = _common.numpy_view(seg_starts.contiguous()), _common.numpy_view(seg_canon.contiguous())
    mask, used = _common.optional_u8(mask_T, "mask_T"), _common.optional_u8(used_P, "used_P")
    sizes = {"m_T": m_T.numel(), "b_T": b_T.numel(), **({"mask_T": mask.shape[0]} if mask_T is not None else {})}
    _common.check_index_map(starts, canon, numel, int(state_offset), sizes)
    if used_P is not None and used.shape[0] != canon.shape[0]:
        raise ValueError(f"used_P has {used.shape[0]} elements, expected one per segment ({canon.shape[0]})")
    bad = _common.run_split(
        _compress_kernel, numel,
        _common.numpy_view(g.contiguous()), _common.numpy_view(m_T.view(-1)), _common.numpy_view(b_T.view(-1)),
        starts, canon, mask, used, int(state_offset),
        np.float32(beta_f), np.float32(omb_f), seed_lo, seed_hi, bool(amsgrad),
        np.float32(beta2_f), np.float32(omb2_f), bool(rms), np.float32(ratio_scale),
        _common.numpy_view(out),
    )
    if flag is not None and any(bad):
        flag.fill_(1)
    return out
