"""Decoupled-weight-decay update in place on CPU (numba): x -= lr * (update + weight_decay * x).

Contract: :func:`dist_supernet.kernels.reference.apply_update_` (fp32 arithmetic, each product rounded, no
fma). The fast path takes contiguous fp32 x and update; anything else goes to the reference.
12 bytes per element (+1 for the mask).
"""

import numpy as np
import torch

from dist_supernet.kernels import reference
from dist_supernet.kernels.cpu import _common
from dist_supernet.kernels.cpu._common import kernel


@kernel
def _apply_update_kernel(x, update, lr, weight_decay, has_weight_decay, mask, lo, hi):
    xs = x[lo:hi]
    us = update[lo:hi]
    if mask.shape[0] > 0:
        ms = mask[lo:hi]
        for i in range(hi - lo):
            step = us[i] + weight_decay * xs[i] if has_weight_decay else us[i]
            new = xs[i] - lr * step
            xs[i] = new if ms[i] != 0 else xs[i]
    else:
        for i in range(hi - lo):
            step = us[i] + weight_decay * xs[i] if has_weight_decay else us[i]
            xs[i] = xs[i] - lr * step


def apply_update_(x, update, *, lr, weight_decay, mask=None):
    """numba twin of :func:`dist_supernet.kernels.reference.apply_update_`; returns x.

    Example::
        >>> apply_update_(torch.ones(3), torch.tensor([1.0, -1.0, 0.0]), lr=0.5, weight_decay=0.0).tolist()
        [0.5, 1.5, 1.0]
    """
    if (x.dtype != torch.float32 or update.dtype != torch.float32 or not x.is_contiguous()
            or update.numel() != x.numel() or (mask is not None and mask.numel() != x.numel())):
        return reference.apply_update_(x, update, lr=lr, weight_decay=weight_decay, mask=mask)
    if x.numel():
        _common.run_split(
            _apply_update_kernel, x.numel(), _common.numpy_view(x.view(-1)),
            _common.numpy_view(update.reshape(-1).contiguous()), np.float32(lr), np.float32(weight_decay),
            weight_decay != 0.0, _common.optional_u8(mask, "mask"),
        )
    return x
