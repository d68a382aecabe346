"""Fused decode-and-apply of one chunk on CPU (numba): x -= lr * (mean + wd * x) per active element.

Contract: :func:`dist_supernet.kernels.reference.apply_packed_`. One pass over the chunk: each block of
BLOCK elements is decoded from the payload (N rows of bits, or [R, K, Cb] exact-count planes)
into an int32 scratch block, then applied segment run by segment run to the parameters. The
P parameters are separate tensors: the kernel gets their data pointers (int64 [P]) and makes
an array of each inside the loop, so nothing is copied. A chunk of contiguous bf16 or fp16
parameters is applied in that dtype: the bits of a run are widened to an fp32 scratch block,
updated in fp32 and narrowed back once, rounded to nearest even (``_halves``). Parameters the
kernel cannot address (other dtypes, mixed dtypes, gaps in memory) go through a contiguous
copy written back once: same values. Per element: payload bits read, x read and written
(8 bytes for fp32, 4 for bf16 / fp16), the mask (1 byte) if given.

Legend: D elements of the chunk, P segments, N rows (or K planes per chunk row).
"""

import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _bits, _common, _halves
from dist_supernet.kernels.cpu._common import BLOCK, helper, kernel

X_KINDS = {torch.float32: _halves.X_FP32, torch.bfloat16: _halves.X_BF16, torch.float16: _halves.X_FP16}


@helper
def _apply_run(x, counts, num_rows, lr, wd, mask, has_mask):
    rows = np.float32(num_rows)
    if has_mask:
        for i in range(x.shape[0]):
            mean = np.float32(2 * counts[i] - num_rows) / rows
            xv = x[i]
            new = xv - lr * (mean + wd * xv)
            x[i] = new if mask[i] != 0 else xv
    else:
        for i in range(x.shape[0]):
            mean = np.float32(2 * counts[i] - num_rows) / rows
            xv = x[i]
            x[i] = xv - lr * (mean + wd * xv)


@helper
def _apply_run_half(bits, counts, num_rows, lr, wd, mask, has_mask, x_kind, scratch):
    """_apply_run on bf16 / fp16 bits: widen into scratch, update in fp32, narrow the active elements back."""
    xs = scratch[:bits.shape[0]]
    _halves.widen(bits, x_kind, xs)
    _apply_run(xs, counts, num_rows, lr, wd, mask, has_mask)
    words = xs.view(np.uint32)
    if has_mask:
        for i in range(bits.shape[0]):
            if mask[i] != 0:
                bits[i] = _halves.narrow_one(words[i], x_kind)
    else:
        for i in range(bits.shape[0]):
            bits[i] = _halves.narrow_one(words[i], x_kind)


@kernel
def _apply_packed_kernel(addresses, seg_starts, seg_canon, payload, weighted, num_rows, lr_P, wd_P, mask, used,
                         state_offset, x_kind, lo, hi):
    """Chunk positions [lo, hi) (lo a multiple of 8)."""
    has_mask = mask.shape[0] > 0
    has_used = used.shape[0] > 0
    row_numel = payload.shape[2] * 8
    lanes = np.zeros(BLOCK, dtype=np.uint8)
    counts = np.zeros(BLOCK, dtype=np.int32)
    scratch = np.zeros(BLOCK if x_kind != _halves.X_FP32 else 0, dtype=np.float32)
    s = _common.segment_of(seg_starts, lo)
    block = lo
    while block < hi:
        # a block lies within one payload row (planes: C = 8 Cb elements per row)
        end = min(block + BLOCK, hi, (block // row_numel + 1) * row_numel)
        _bits.decode_counts(payload, weighted, block, end - block, lanes, counts)
        j = block
        while j < end:
            while seg_starts[s + 1] <= j:
                s += 1
            run_end = min(seg_starts[s + 1], end)
            if not (has_used and used[s] == 0):
                offset = j - seg_starts[s]
                state = seg_canon[s] + offset - state_offset
                run_mask = mask[state:state + run_end - j] if has_mask else mask
                run_counts = counts[j - block:run_end - block]
                if x_kind == _halves.X_FP32:
                    x = _common.float32_array_at(addresses[s], seg_starts[s + 1] - seg_starts[s])
                    _apply_run(x[offset:offset + run_end - j], run_counts, num_rows, lr_P[s], wd_P[s], run_mask,
                               has_mask)
                else:
                    bits = _common.uint16_array_at(addresses[s], seg_starts[s + 1] - seg_starts[s])
                    _apply_run_half(bits[offset:offset + run_end - j], run_counts, num_rows, lr_P[s], wd_P[s],
                                    run_mask, has_mask, x_kind, scratch)
            j = run_end
        block = end


def apply_packed_(xs, seg_starts, seg_canon, payload, *, planes, num_rows, lr_P, wd_P, mask_T=None, used_P=None,
                  state_offset=0):
    """numba twin of :func:`dist_supernet.kernels.reference.apply_packed_` (same values; xs updated in place).

    Example::
        >>> xs = [torch.ones(2), torch.ones(1)]; starts, canon = reference.index_map([2, 1])
        >>> rows = torch.tensor([[5], [5]], dtype=torch.uint8)
        >>> apply_packed_(xs, starts, canon, rows, planes=False, num_rows=2,
        ...               lr_P=torch.tensor([0.5, 0.25]), wd_P=torch.zeros(2))
        >>> xs[0].tolist(), xs[1].tolist()
        ([0.5, 1.5], [0.75])
    """
    reference.check_index_map(seg_starts, seg_canon)
    starts = reference.check_segment_params(xs, seg_starts)
    numel = starts[-1]
    if numel == 0:
        return
    if num_rows <= 0:
        raise ValueError(f"num_rows={num_rows}: expected at least one counted row")
    reference.check_payload(payload, planes=planes, numel=numel)
    payload3 = payload.contiguous() if planes else payload.contiguous().unsqueeze(0)
    # One dtype for the chunk (DDP buckets hold one): fp32, bf16, fp16 in place; else fp32 copies.
    dtypes = {x.dtype for x in xs if x.numel()}
    kind_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    kind_dtype = kind_dtype if kind_dtype in X_KINDS else torch.float32
    staged = []  # (parameter, contiguous copy) for the parameters the kernel cannot address in place
    addresses = torch.zeros(len(xs), dtype=torch.int64)
    for s, x in enumerate(xs):
        if x.numel() == 0:
            continue
        target = x
        if x.dtype != kind_dtype or not x.is_contiguous():
            target = x.detach().to(kind_dtype, memory_format=torch.contiguous_format, copy=True)
            staged.append((x, target))
        addresses[s] = target.data_ptr()
    lr = lr_P.detach().to(torch.float32).contiguous()
    wd = wd_P.detach().to(torch.float32).contiguous()
    starts_np, canon_np = _common.numpy_view(seg_starts.contiguous()), _common.numpy_view(seg_canon.contiguous())
    mask, used = _common.optional_u8(mask_T, "mask_T"), _common.optional_u8(used_P, "used_P")
    if mask_T is not None:
        _common.check_index_map(starts_np, canon_np, numel, int(state_offset), {"mask_T": mask.shape[0]})
    for name, tensor in (("lr_P", lr), ("wd_P", wd), ("used_P", used if used_P is not None else None)):
        if tensor is not None and tensor.shape[0] != len(xs):
            raise ValueError(f"{name} has {tensor.shape[0]} elements, expected one per segment ({len(xs)})")
    _common.run_split(
        _apply_packed_kernel, numel, _common.numpy_view(addresses), starts_np, canon_np,
        _common.numpy_view(payload3), bool(planes), int(num_rows), _common.numpy_view(lr), _common.numpy_view(wd),
        mask, used, int(state_offset), X_KINDS[kind_dtype],
    )
    for x, target in staged:
        x.copy_(target.view(x.shape))
    del staged  # the copies stay alive until here: the kernel wrote through their pointers
