"""Fused decode-and-apply of one chunk: x -= lr * (mean + wd * x) for every active element.

One launch per chunk (not per parameter): each program decodes a [BLOCK_BYTES, 8] tile of
the chunk's packed result (N rows of bits, or [R, K, Cb] exact-count planes) in registers,
finds each element's segment (binary search over seg_starts), and updates the parameter
through a table of data pointers (int64 [P], cast to float32 pointers in the kernel; this
runs under TRITON_INTERPRET=1 too). ū never touches memory: N / 8 bytes of payload plus
8 bytes of fp32 x per element (+1 for the mask). Parameters that are not contiguous fp32
(bf16, fp16, channels_last) are updated through an fp32 contiguous copy written back once:
the same values, since the update is fp32 and rounds once to x's dtype. Launched with
enable_fp_fusion=False. Contract: :func:`dist_supernet.kernels.reference.apply_packed_`.

Legend: D elements of the chunk, P segments, N rows (or R chunk rows of K planes, Cb bytes).
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _launch
from dist_supernet.kernels.ops._segments import canonical_index


# x lives behind the pointer table, which autotune's restore_value cannot restore: tuning
# would apply the update several times. So tuning only ever runs on dummy parameters:
# _tune_on_dummies before the first real launch of each size class (or autotune_warmup).
@_launch.byte_blocked()
@triton.jit(do_not_specialize=["num_rows", "state_offset"])
def _apply_packed_kernel(
    address_ptr,  # [P] int64 data pointers of the fp32 contiguous parameters (0: empty segment)
    seg_starts_ptr,  # [P + 1] int64 chunk-local segment starts
    seg_canon_ptr,  # [P] int64 canonical index of each segment's first element
    payload_ptr,  # uint8 payload: N rows [N, B'] (PLANES False) or planes [R, K, Cb] (PLANES True)
    lr_ptr,  # [P] fp32 learning rate per segment
    wd_ptr,  # [P] fp32 weight decay per segment
    mask_ptr,  # [T] uint8 view of the bool mask; unused unless HAS_MASK
    used_ptr,  # [P] uint8 (0 = unused segment); unused unless HAS_USED
    numel,  # D
    num_segments,  # P (>= 1)
    num_steps,  # ceil(log2(P))
    num_rows,  # N: the mean is (2 count - N) / N
    num_planes,  # rows of bits (PLANES False) or planes per chunk row (PLANES True)
    plane_stride,  # bytes between rows of bits / between planes
    row_bytes,  # Cb (PLANES True): bytes per plane of one chunk row
    row_stride,  # bytes between chunk rows (PLANES True)
    state_offset,  # canonical index of mask_ptr[0]
    size_class,  # autotune key only: ceil(log2(D))
    PLANES: tl.constexpr,  # count = sum_k bit_k << k over the planes of row j // (8 Cb)
    HAS_MASK: tl.constexpr,
    HAS_USED: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,  # payload bytes per program (8 elements each)
):
    byte = tl.program_id(0) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    offsets = byte[:, None].to(tl.int64) * 8 + bit[None, :]
    in_range = offsets < numel
    byte_in_range = byte * 8 < numel

    if PLANES:
        chunk_row = byte // row_bytes
        source = payload_ptr + chunk_row.to(tl.int64) * row_stride + (byte - chunk_row * row_bytes)
    else:
        source = payload_ptr + byte
    count = tl.zeros((BLOCK_BYTES, 8), dtype=tl.int32)
    for plane in range(num_planes):
        value = tl.load(source + plane * plane_stride, mask=byte_in_range, other=0).to(tl.int32)
        if PLANES:
            count += ((value[:, None] >> bit[None, :]) & 1) << plane
        else:
            count += (value[:, None] >> bit[None, :]) & 1
    # (2 count - N) is exact in fp32; div_rn: IEEE division, the one rounding of the contract
    mean = tl.div_rn((count * 2 - num_rows).to(tl.float32), num_rows.to(tl.float32))

    canon, seg = canonical_index(seg_starts_ptr, seg_canon_ptr, offsets, num_segments, num_steps)
    active = in_range
    if HAS_MASK:
        active = active & (tl.load(mask_ptr + (canon - state_offset), mask=in_range, other=0) != 0)
    if HAS_USED:
        active = active & (tl.load(used_ptr + seg, mask=in_range, other=0) != 0)
    address = tl.load(address_ptr + seg, mask=in_range, other=0)
    x_ptr = address.to(tl.pointer_type(tl.float32), bitcast=True) + (offsets - tl.load(seg_starts_ptr + seg))
    lr = tl.load(lr_ptr + seg, mask=in_range, other=0.0)
    wd = tl.load(wd_ptr + seg, mask=in_range, other=0.0)
    x = tl.load(x_ptr, mask=active, other=0.0)
    # the contract's rounding, no fma: t = fl(wd x); s = fl(mean + t); x = fl(x - fl(lr s))
    x_new = x - lr * (mean + wd * x)
    tl.store(x_ptr, x_new, mask=active)


_tuned: set = set()  # (device, size class, planes, has mask, has used): tuned on dummies already


def _tune_on_dummies(numel, device, payload, *, planes, num_rows, has_mask, has_used):
    """Let the autotuner pick a config for this size class on a dummy parameter, not on the real ones."""
    key = (str(device), _launch.size_class(numel), bool(planes), has_mask, has_used)
    if key in _tuned or _launch.interpreting():
        return
    _tuned.add(key)
    dummy = [torch.zeros(numel, device=device)]
    starts = torch.tensor([0, numel], dtype=torch.int64, device=device)
    canon = torch.zeros(1, dtype=torch.int64, device=device)
    one = torch.ones(1, device=device)
    apply_packed_(dummy, starts, canon, torch.zeros_like(payload), planes=planes, num_rows=num_rows, lr_P=one,
                  wd_P=one, mask_T=torch.ones(numel, dtype=torch.uint8, device=device) if has_mask else None,
                  used_P=torch.ones(1, dtype=torch.uint8, device=device) if has_used else None)


def apply_packed_(xs, seg_starts, seg_canon, payload, *, planes, num_rows, lr_P, wd_P, mask_T=None, used_P=None,
                  state_offset=0):
    """Triton twin of :func:`dist_supernet.kernels.reference.apply_packed_` (same values; xs updated in place).

    Example::
        >>> xs = [torch.ones(2, device="cuda"), torch.ones(1, device="cuda")]
        >>> starts, canon = kernels.index_map([2, 1], device="cuda")
        >>> rows = torch.tensor([[5], [5]], dtype=torch.uint8, device="cuda")
        >>> lr, wd = torch.tensor([0.5, 0.25], device="cuda"), torch.zeros(2, device="cuda")
        >>> apply_packed_(xs, starts, canon, rows, planes=False, num_rows=2, lr_P=lr, wd_P=wd)
        >>> xs[0].tolist(), xs[1].tolist()
        ([0.5, 1.5], [0.75])
    """
    num_segments = reference.check_index_map(seg_starts, seg_canon)
    if len(xs) != num_segments:
        raise ValueError(f"xs has {len(xs)} tensors, expected one per segment ({num_segments})")
    numel = sum(x.numel() for x in xs)  # host metadata only: seg_starts stays on the device
    _launch.check_numel(numel)
    if numel == 0:
        return
    if num_rows <= 0:
        raise ValueError(f"num_rows={num_rows}: expected at least one counted row")
    reference.check_payload(payload, planes=planes, numel=numel)
    if payload.stride(-1) != 1:
        payload = payload.contiguous()
    device = payload.device
    _tune_on_dummies(numel, device, payload, planes=planes, num_rows=num_rows, has_mask=mask_T is not None,
                     has_used=used_P is not None)
    staged = []  # (parameter, fp32 contiguous copy) for the parameters the kernel cannot address
    addresses = []
    for x in xs:
        target = x
        if x.numel() and (x.dtype != torch.float32 or not x.is_contiguous()):
            target = x.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            staged.append((x, target))
        addresses.append(target.data_ptr() if x.numel() else 0)
    address_P = torch.tensor(addresses, dtype=torch.int64).to(device, non_blocking=True)
    mask_u8 = _launch.mask_bytes(mask_T)
    used_u8 = _launch.mask_bytes(used_P)
    if planes:
        num_planes, plane_stride = payload.shape[1], payload.stride(1)
        row_bytes, row_stride = payload.shape[2], payload.stride(0)
    else:
        num_planes, plane_stride = payload.shape[0], payload.stride(0)
        row_bytes, row_stride = payload.shape[1], 0
    _launch.launch_bytes(
        _apply_packed_kernel,
        numel,
        address_P,
        seg_starts.contiguous(),
        seg_canon.contiguous(),
        payload,
        lr_P.to(torch.float32).contiguous(),
        wd_P.to(torch.float32).contiguous(),
        address_P if mask_u8 is None else mask_u8,
        address_P if used_u8 is None else used_u8,
        numel,
        num_segments,
        _launch.search_steps(num_segments),
        int(num_rows),
        num_planes,
        plane_stride,
        row_bytes,
        row_stride,
        int(state_offset),
        PLANES=bool(planes),
        HAS_MASK=mask_u8 is not None,
        HAS_USED=used_u8 is not None,
    )
    for x, target in staged:
        x.copy_(target.view(x.shape))
