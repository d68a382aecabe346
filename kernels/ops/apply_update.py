"""Decoupled-weight-decay update in place: x -= lr * (update + weight_decay * x).

Elementwise over x in its logical order: reads x and update, writes x (12 bytes per fp32
element, +1 for the mask). Arithmetic is fp32, each product rounded (launched with
enable_fp_fusion=False), exactly as :func:`dist_supernet.kernels.reference.apply_update_`. Contiguous
bf16 / fp16 parameters are read and written in their dtype (fp32 in registers, rounded to
nearest even once at the store); a parameter that is not contiguous (channels_last, a
transposed view) is updated through an fp32 contiguous copy that torch writes back once, so
its mask and update apply to the logical elements (issue 11). See :mod:`dist_supernet.kernels.ops.apply_packed` for the
variant that reads packed rows instead of a float update.

Legend: D elements.
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _launch


@triton.jit
def _apply_update_kernel(
    x_ptr,  # [D] parameters, contiguous, updated in place: fp32, bf16 bits as int16, fp16 (X_KIND)
    update_ptr,  # [D] update (any float dtype), read
    mask_ptr,  # [D] uint8 view of the bool mask; unused unless HAS_MASK
    numel,  # D
    lr,  # fp32 learning rate
    weight_decay,  # fp32 decoupled weight decay; unused unless HAS_WEIGHT_DECAY
    HAS_WEIGHT_DECAY: tl.constexpr,  # the reference skips x * wd when wd == 0 (matters for inf x)
    HAS_MASK: tl.constexpr,  # elements where the mask is False are not written
    X_KIND: tl.constexpr,  # x's dtype: 0 fp32, 1 bf16, 2 fp16 (_launch.X_KINDS); arithmetic in fp32 either way
    BLOCK_BYTES: tl.constexpr,  # 8 * BLOCK_BYTES elements per program, as the packed kernels
):
    offsets = tl.program_id(0).to(tl.int64) * (BLOCK_BYTES * 8) + tl.arange(0, BLOCK_BYTES * 8)
    in_range = offsets < numel
    if HAS_MASK:
        in_range = in_range & (tl.load(mask_ptr + offsets, mask=in_range, other=0) != 0)
    x = _launch.load_x(x_ptr + offsets, in_range, X_KIND)
    step = tl.load(update_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    if HAS_WEIGHT_DECAY:
        step = step + x * weight_decay
    x_new = x - lr * step  # two roundings: the product, then the difference
    _launch.store_x(x_ptr + offsets, x_new, in_range, X_KIND)


def apply_update_(x, update, *, lr, weight_decay, mask=None):
    """Triton twin of :func:`dist_supernet.kernels.reference.apply_update_`; returns x, updated in place.

    update and mask are read as flat arrays in x's logical order. Contiguous fp32, bf16 and fp16 x
    are loaded and stored in their own dtype (fp32 arithmetic in registers, one rounding to
    nearest even at the store); any other x goes through an fp32 copy.

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
    staged = x.dtype not in _launch.X_KINDS or not x.is_contiguous()
    target = x.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True) if staged else x
    mask_u8 = _launch.mask_bytes(mask, numel)
    update_flat = update.reshape(-1).contiguous()
    device, x_dtype, u_dtype, has_mask = x.device, target.dtype, update_flat.dtype, mask_u8 is not None

    def warm():  # the same key on dummies (for _launch.tune_missed)
        n = _launch.dummy_numel(numel)
        apply_update_(torch.zeros(n, dtype=x_dtype, device=device), torch.zeros(n, dtype=u_dtype, device=device),
                      lr=lr, weight_decay=weight_decay,
                      mask=torch.ones(n, dtype=torch.uint8, device=device) if has_mask else None)

    _launch.launch(
        _apply_update_kernel, numel,
        (_launch.x_view(target), update_flat, update_flat if mask_u8 is None else mask_u8, numel, reference.as_float32(lr),
         reference.as_float32(weight_decay)),
        device=device, warm=warm,
        constexprs=dict(HAS_WEIGHT_DECAY=weight_decay != 0.0, HAS_MASK=has_mask, X_KIND=_launch.X_KINDS[target.dtype]),
    )
    if staged:
        x.copy_(target.view(x.shape))
    return x
