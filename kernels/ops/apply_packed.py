"""Fused decode-and-apply of one chunk: x -= lr * (mean + wd * x) for every active element.

One launch per chunk (not per parameter): each program decodes a [BLOCK_BYTES, 8] tile of
the chunk's packed result (N rows of bits, or [R, K, Cb] exact-count planes) in registers,
finds each element's segment (binary search over seg_starts), and updates the parameter
through a table of data pointers (int64 [P], cast to float32 pointers in the kernel; this
runs under TRITON_INTERPRET=1 too). ū never touches memory: N / 8 bytes of payload plus
8 bytes of fp32 x per element (4 for bf16 / fp16; +1 for the mask). Parameters are flat views
in chunk order (``Chunk.param_views``): fp32, bf16 and fp16 ones are read and written in their
own dtype, with fp32 arithmetic in registers and one rounding to nearest even at the store;
a chunk that mixes dtypes, or holds another dtype or a view the kernel cannot address, has
those parameters updated through an fp32 copy written back once (the same values). The
pointer table is cached by value (its content is the key), so a step copies nothing to the
device. Launched with enable_fp_fusion=False. Contract:
:func:`dist_supernet.kernels.reference.apply_packed_`.

Legend: D elements of the chunk, P segments, N rows (or R chunk rows of K planes, Cb bytes).
"""

import collections
import threading

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _launch
from dist_supernet.kernels.ops._segments import canonical_index


# Tuned on dummy parameters only (kernels.ops._launch): the real x lives behind the pointer table.
# P varies between the warm-up's dummies and the real chunks: not specialized, so no recompile.
@triton.jit(do_not_specialize=["num_rows", "state_offset", "num_segments", "num_steps"])
def _apply_packed_kernel(
    address_ptr,  # [P] int64 data pointers of the contiguous parameters (0: empty segment)
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
    PLANES: tl.constexpr,  # count = sum_k bit_k << k over the planes of row j // (8 Cb)
    HAS_MASK: tl.constexpr,
    HAS_USED: tl.constexpr,
    X_KIND: tl.constexpr,  # the parameters' dtype: 0 fp32, 1 bf16, 2 fp16 (_launch.X_KINDS)
    BLOCK_BYTES: tl.constexpr,  # payload bytes per program (8 elements each)
):
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    offsets = byte[:, None] * 8 + bit[None, :]
    in_range = offsets < numel
    byte_in_range = byte * 8 < numel

    if PLANES:
        chunk_row = byte // row_bytes
        source = payload_ptr + chunk_row * row_stride + (byte - chunk_row * row_bytes)
    else:
        source = payload_ptr + byte
    count = tl.zeros((BLOCK_BYTES, 8), dtype=tl.int32)
    for plane in range(num_planes):
        value = tl.load(source, mask=byte_in_range, other=0).to(tl.int32)
        if PLANES:
            count += ((value[:, None] >> bit[None, :]) & 1) << plane
        else:
            count += (value[:, None] >> bit[None, :]) & 1
        source += plane_stride  # a pointer step: plane * plane_stride overflows int32 at 1 GiB rows x 3
    # (2 count - N) is exact in fp32; div_rn: IEEE division, the one rounding of the contract
    mean = tl.div_rn((count * 2 - num_rows).to(tl.float32), num_rows.to(tl.float32))

    canon, seg = canonical_index(seg_starts_ptr, seg_canon_ptr, offsets, num_segments, num_steps)
    active = in_range
    if HAS_MASK:
        active = active & (tl.load(mask_ptr + (canon - state_offset), mask=in_range, other=0) != 0)
    if HAS_USED:
        active = active & (tl.load(used_ptr + seg, mask=in_range, other=0) != 0)
    address = tl.load(address_ptr + seg, mask=in_range, other=0)
    x_ptr = _launch.x_pointers(address, offsets - tl.load(seg_starts_ptr + seg), X_KIND)
    lr = tl.load(lr_ptr + seg, mask=in_range, other=0.0)
    wd = tl.load(wd_ptr + seg, mask=in_range, other=0.0)
    x = _launch.load_x(x_ptr, active, X_KIND)
    # the contract's rounding, no fma: t = fl(wd x); s = fl(mean + t); x = fl(x - fl(lr s))
    x_new = x - lr * (mean + wd * x)
    _launch.store_x(x_ptr, x_new, active, X_KIND)


_ADDRESS_CACHE_SIZE = 4096
_addresses = collections.OrderedDict()  # (device, data pointers) -> int64 [P] on the device
_addresses_lock = threading.Lock()


def _address_table(addresses, device):
    """The int64 pointer table on ``device``, copied once per distinct content (an LRU by value).

    Keyed by the pointers themselves, so a cached table is right whatever was freed since; the
    parameters of a chunk keep their storage, so a step hits the cache and copies nothing.
    """
    key = (str(device), tuple(addresses))
    with _addresses_lock:
        table = _addresses.get(key)
        if table is not None:
            _addresses.move_to_end(key)
            return table
    host = torch.tensor(addresses, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()  # so the copy below is asynchronous: no host sync
    table = host.to(device, non_blocking=True)
    with _addresses_lock:
        _addresses[key] = table
        while len(_addresses) > _ADDRESS_CACHE_SIZE:
            _addresses.popitem(last=False)
    return table


def _kernel_targets(xs):
    """(X_KIND, targets, staged): what the kernel addresses for each parameter, and the copies to write back.

    A chunk of one dtype (DDP buckets hold one) among fp32, bf16, fp16 is addressed in that dtype;
    a parameter the kernel cannot address in place (gaps in memory) gets a contiguous copy of that
    dtype. A chunk of mixed or other dtypes is applied through fp32 copies (torch rounds them back).
    """
    dtypes = {x.dtype for x in xs if x.numel()}
    kind_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if kind_dtype not in _launch.X_KINDS:
        kind_dtype = torch.float32
    targets, staged = [], []
    for x in xs:
        target = x
        if x.numel() and (x.dtype != kind_dtype or not x.is_contiguous()):
            target = x.detach().to(kind_dtype, memory_format=torch.contiguous_format, copy=True)
            staged.append((x, target))
        targets.append(target)
    return _launch.X_KINDS[kind_dtype], targets, staged


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
    x_kind, targets, staged = _kernel_targets(xs)
    address_P = _address_table([t.data_ptr() if t.numel() else 0 for t in targets], device)
    mask_u8 = _launch.mask_bytes(mask_T)
    used_u8 = _launch.mask_bytes(used_P)
    if planes:
        num_planes, plane_stride = payload.shape[1], payload.stride(1)
        row_bytes, row_stride = payload.shape[2], payload.stride(0)
    else:
        num_planes, plane_stride = payload.shape[0], payload.stride(0)
        row_bytes, row_stride = payload.shape[1], 0
    x_dtype = next(dtype for dtype, kind in _launch.X_KINDS.items() if kind == x_kind)
    has_mask, has_used = mask_u8 is not None, used_u8 is not None

    def warm():  # the same key on a dummy parameter of this size (for _launch.tune_missed)
        n, one = _launch.dummy_numel(numel), torch.ones(1, device=device)
        if planes:  # whole chunk rows of the same plane count, enough for n elements
            shape = (-(-n // (8 * row_bytes)), num_planes, row_bytes)
        else:
            shape = (num_planes, (n + 7) // 8)
        apply_packed_([torch.zeros(n, dtype=x_dtype, device=device)], *reference.index_map([n], device=device),
                      torch.zeros(shape, dtype=torch.uint8, device=device), planes=planes, num_rows=num_rows,
                      lr_P=one, wd_P=one, mask_T=torch.ones(n, dtype=torch.uint8, device=device) if has_mask else None,
                      used_P=torch.ones(1, dtype=torch.uint8, device=device) if has_used else None)

    _launch.launch(
        _apply_packed_kernel, numel,
        (address_P, seg_starts.contiguous(), seg_canon.contiguous(), payload, lr_P.to(torch.float32).contiguous(),
         wd_P.to(torch.float32).contiguous(), address_P if mask_u8 is None else mask_u8,
         address_P if used_u8 is None else used_u8, numel, num_segments, _launch.search_steps(num_segments),
         int(num_rows), num_planes, plane_stride, row_bytes, row_stride, int(state_offset)),
        device=device, warm=warm, loop_bounds=(num_planes,),
        constexprs=dict(PLANES=bool(planes), HAS_MASK=has_mask, HAS_USED=has_used, X_KIND=x_kind),
    )
    for x, target in staged:
        x.copy_(target.view(x.shape))
