"""Fused decompress-and-apply: x -= lr * (mean of N packed rows of +-1 + weight_decay * x).

The same result as :func:`kernels.ops.unpack_mean.unpack_mean` followed by
:func:`kernels.ops.apply_update.apply_update_`, without the float32 update ever
touching memory: N / 8 bytes of packed rows plus 8 bytes of fp32 x per
element, instead of N / 8 + 4 (unpack) and 12 (apply). Contract:
:func:`kernels.reference.apply_packed_`.

Legend: N rows, D elements, B bytes per row (B >= ceil(D / 8)).
"""

import torch
import triton
import triton.language as tl

from kernels.ops import _launch


@triton.autotune(
    configs=_launch.byte_block_configs(),
    key=["size_class"],
    prune_configs_by={"early_config_prune": _launch.keep_default_when_interpreting},
    restore_value=["x_ptr"],  # tuning runs the kernel several times: undo its in-place update
)
@triton.jit(do_not_specialize=["num_rows"])
def _apply_packed_kernel(
    x_ptr,  # [D] parameters (fp32 / bf16 / fp16), updated in place
    packed_ptr,  # [N, B] uint8 packed rows, row r starts at packed_ptr + r * row_stride
    mask_ptr,  # [D] uint8 view of the bool mask; unused unless HAS_MASK
    numel,  # D
    num_rows,  # N
    row_stride,  # bytes between rows of packed
    lr,  # fp32 learning rate
    weight_decay,  # fp32 decoupled weight decay; unused unless HAS_WEIGHT_DECAY
    size_class,  # autotune key only: ceil(log2(D))
    HAS_WEIGHT_DECAY: tl.constexpr,  # the reference skips x * wd when wd == 0 (matters for inf x)
    HAS_MASK: tl.constexpr,  # elements where the mask is False are not written
    BLOCK_BYTES: tl.constexpr,  # bytes of each row per program (8 elements each)
):
    byte = tl.program_id(0) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    offsets = byte[:, None] * 8 + bit[None, :]
    in_range = offsets < numel
    byte_in_range = byte * 8 < numel

    count = tl.zeros((BLOCK_BYTES, 8), dtype=tl.int32)
    row_ptr = packed_ptr
    for _ in range(num_rows):
        row = tl.load(row_ptr + byte, mask=byte_in_range, other=0).to(tl.int32)
        count += (row[:, None] >> bit[None, :]) & 1
        row_ptr += row_stride
    # As unpack_mean (IEEE division), then as apply_update_ (fp32, one fma, one final rounding).
    step = tl.div_rn((count * 2 - num_rows).to(tl.float32), num_rows.to(tl.float32))

    if HAS_MASK:
        in_range = in_range & (tl.load(mask_ptr + offsets, mask=in_range, other=0) != 0)
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0)
    if HAS_WEIGHT_DECAY:
        step = step + x.to(tl.float32) * weight_decay
    x_new = tl.fma(-lr, step, x.to(tl.float32))
    tl.store(x_ptr + offsets, x_new.to(x.dtype), mask=in_range)


def apply_packed_(
    x: torch.Tensor,
    packed_NB: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`kernels.reference.apply_packed_`; returns x (contiguous, updated in place).

    Example::
        >>> x = torch.ones(3, device="cuda")
        >>> rows = torch.tensor([[0b101], [0b101]], dtype=torch.uint8, device="cuda")
        >>> apply_packed_(x, rows, lr=0.5, weight_decay=0.0).tolist()
        [0.5, 1.5, 0.5]
    """
    numel = x.numel()
    _launch.check_numel(numel)
    _launch.check_inplace("x", x, numel)
    if packed_NB.dim() != 2 or packed_NB.dtype != torch.uint8:
        raise ValueError(f"packed_NB: expected uint8 [N, B], got {packed_NB.dtype} {list(packed_NB.shape)}")
    if packed_NB.shape[1] * 8 < numel:
        raise ValueError(f"packed_NB has {packed_NB.shape[1]} bytes per row, too few for numel={numel}")
    if numel == 0:
        return x
    if packed_NB.shape[0] == 0:
        raise ValueError("packed_NB has no rows: the mean of 0 rows is undefined")
    if packed_NB.stride(1) != 1:
        packed_NB = packed_NB.contiguous()
    mask_u8 = _launch.mask_bytes(mask, numel)
    num_bytes = (numel + 7) // 8
    grid = lambda meta: (triton.cdiv(num_bytes, meta["BLOCK_BYTES"]),)  # noqa: E731
    _apply_packed_kernel[grid](
        x,
        packed_NB,
        packed_NB if mask_u8 is None else mask_u8,
        numel,
        packed_NB.shape[0],
        packed_NB.stride(0),
        float(lr),
        float(weight_decay),
        _launch.size_class(numel),
        HAS_WEIGHT_DECAY=weight_decay != 0.0,
        HAS_MASK=mask_u8 is not None,
    )
    return x
