"""Decoupled-weight-decay update in place: x -= lr * (update + weight_decay * x).

Elementwise over x in its logical order: reads x and update, writes x (12 bytes per fp32
element, +1 for the mask). Arithmetic is fp32, each product rounded (launched with
enable_fp_fusion=False), exactly as :func:`dist_supernet.kernels.reference.apply_update_`. A parameter that
is not contiguous fp32 (bf16, fp16, channels_last, a transposed view) is updated through an
fp32 contiguous copy that torch writes back once (rounding to x's dtype as the reference
does), so its mask and update apply to the logical elements (issue 11). See :mod:`dist_supernet.kernels.ops.apply_packed` for the
variant that reads packed rows instead of a float update.

Legend: D elements.
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _launch


@_launch.byte_blocked(restore_value=["x_ptr"])  # tuning runs the kernel several times: undo its in-place update
@triton.jit
def _apply_update_kernel(
    x_ptr,  # [D] fp32 parameters, contiguous, updated in place
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
        step = step + x * weight_decay
    x_new = x - lr * step  # two roundings: the product, then the difference
    tl.store(x_ptr + offsets, x_new, mask=in_range)


def apply_update_(x, update, *, lr, weight_decay, mask=None):
    """Triton twin of :func:`dist_supernet.kernels.reference.apply_update_`; returns x, updated in place.

    update and mask are read as flat arrays in x's logical order.

    Example::
        >>> x = torch.ones(3, device="cuda")
        >>> apply_update_(x, torch.tensor([1.0, -1.0, 0.0], device="cuda"), lr=0.5, weight_decay=0.0).tolist()
        [0.5, 1.5, 1.0]
    """
    numel = x.numel()
    _launch.check_numel(numel)
    _launch.check_same_numel("update", update, numel)
    if numel == 0:
        return x
    # fp32 contiguous in the kernel; anything else through an fp32 copy that torch rounds back to
    # x's dtype (round to nearest even: the interpreter's own fp32 -> bf16 cast truncates)
    staged = x.dtype != torch.float32 or not x.is_contiguous()
    target = x.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True) if staged else x
    mask_u8 = _launch.mask_bytes(mask, numel)
    update_flat = update.reshape(-1).contiguous()
    _launch.launch_bytes(
        _apply_update_kernel,
        numel,
        target,
        update_flat,
        update_flat if mask_u8 is None else mask_u8,
        numel,
        reference.as_float32(lr),
        reference.as_float32(weight_decay),
        HAS_WEIGHT_DECAY=weight_decay != 0.0,
        HAS_MASK=mask_u8 is not None,
    )
    if staged:
        x.copy_(target.view(x.shape))
    return x
