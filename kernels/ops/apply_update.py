"""Decoupled-weight-decay update in place: x -= lr * (update + weight_decay * x).

Elementwise over flat x: reads x and update, writes x (12 bytes per fp32
element, +1 for the mask). Arithmetic is fp32 whatever x's dtype, rounded once
to x's dtype at the store; the torch reference rounds each intermediate to
x's dtype, so bf16/fp16 parameters can differ from it by one unit in the last
place. Contract: :func:`kernels.reference.apply_update_`. See
:mod:`kernels.ops.apply_packed` for the variant that reads packed rows instead of
a float update.

Legend: D elements.
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
@triton.jit
def _apply_update_kernel(
    x_ptr,  # [D] parameters (fp32 / bf16 / fp16), updated in place
    update_ptr,  # [D] update (any float dtype), read
    mask_ptr,  # [D] uint8 view of the bool mask; unused unless HAS_MASK
    numel,  # D
    lr,  # fp32 learning rate
    weight_decay,  # fp32 decoupled weight decay; unused unless HAS_WEIGHT_DECAY
    size_class,  # autotune key only: ceil(log2(D))
    HAS_WEIGHT_DECAY: tl.constexpr,  # the reference skips x * wd when wd == 0 (matters for inf x)
    HAS_MASK: tl.constexpr,  # elements where the mask is False are not written
    BLOCK_BYTES: tl.constexpr,  # 8 * BLOCK_BYTES elements per program, as the packed kernels
):
    offsets = tl.program_id(0) * (BLOCK_BYTES * 8) + tl.arange(0, BLOCK_BYTES * 8)
    in_range = offsets < numel
    if HAS_MASK:
        in_range = in_range & (tl.load(mask_ptr + offsets, mask=in_range, other=0) != 0)
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0)
    step = tl.load(update_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    if HAS_WEIGHT_DECAY:
        step = step + x.to(tl.float32) * weight_decay
    # Written as the reference's x.sub_(step, alpha=lr), which torch evaluates as one fma.
    x_new = tl.fma(-lr, step, x.to(tl.float32))
    tl.store(x_ptr + offsets, x_new.to(x.dtype), mask=in_range)


def apply_update_(
    x: torch.Tensor,
    update: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`kernels.reference.apply_update_`; returns x.

    x must be contiguous (it is updated in place); update and mask are read as
    flat arrays with x's number of elements.

    Example::
        >>> x = torch.ones(3, device="cuda")
        >>> apply_update_(x, torch.tensor([1.0, -1.0, 0.0], device="cuda"), lr=0.5, weight_decay=0.0).tolist()
        [0.5, 1.5, 1.0]
    """
    numel = x.numel()
    _launch.check_numel(numel)
    _launch.check_inplace("x", x, numel)
    _launch.check_same_numel("update", update, numel)
    if numel == 0:
        return x
    mask_u8 = _launch.mask_bytes(mask, numel)
    update_flat = update.reshape(-1).contiguous()
    grid = lambda meta: (triton.cdiv(numel, meta["BLOCK_BYTES"] * 8),)  # noqa: E731
    _apply_update_kernel[grid](
        x,
        update_flat,
        update_flat if mask_u8 is None else mask_u8,
        numel,
        float(lr),
        float(weight_decay),
        _launch.size_class(numel),
        HAS_WEIGHT_DECAY=weight_decay != 0.0,
        HAS_MASK=mask_u8 is not None,
    )
    return x
