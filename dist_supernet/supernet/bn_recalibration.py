"""BatchNorm recalibration: exact running statistics of the active subnet, identical on every rank.

Weight-sharing training leaves BN running stats that fit no subnet in
particular (each step updates them with a different arch), so before
evaluating or exporting a subnet its stats are re-estimated on a few batches
(OFA, BigNAS).

How: the model runs in eval mode except the BN layers, which normalise with
batch statistics exactly as in training (so every layer sees the features it
would see in training). A forward pre-hook on every BN layer accumulates, per
channel of the *active* width, the sum and the sum of squares of its input
(float64) and the element count. These are all-reduced across ranks when
torch.distributed is initialised, and each layer gets

    running_mean = S / n,   running_var = (SS / n - mean^2) * n / (n - 1)

(the unbiased variance, as ``nn.BatchNorm2d`` stores it), i.e. the true mean
and variance of the active features over all ranks' data, not an average of
per-batch estimates. Channels beyond the active width and layers of skipped
blocks are left as they were. The pass itself does not move running stats
(momentum is set to 0 during it) and ``num_batches_tracked`` is restored.

float64 sums: the ``SS / n - mean^2`` form loses precision only when
|mean| / std exceeds about 1e6, far beyond normalised activations.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _input_of(batch):
    """Batches may be bare tensors or ``(inputs, targets, ...)`` tuples."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> int:
    """Re-estimate the running stats of every BN layer the current forward uses; returns the global sample count.

    For a supernet, ``set_active(arch)`` first; the recalibrated stats then sit
    in the shared buffers' active slice (export right after). Works on plain
    modules too. Every rank of ``group`` must call it with the same active arch.

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> net = OFACNN(in_channels=1, image_size=8, num_classes=10)
        >>> net.set_active(net.min_arch())
        >>> recalibrate_bn(net, [torch.randn(16, 1, 8, 8) for _ in range(3)])
        48
    """
    if num_batches is not None and (int(num_batches) != num_batches or num_batches < 1):
        raise ValueError(f"num_batches={num_batches!r}: expected a positive integer or None")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    stats: dict[int, list[torch.Tensor]] = {}  # layer index -> [sum_C, sumsq_C, count]

    def make_hook(index: int):
        def hook(module, inputs):
            x = inputs[0].detach().to(torch.float64)
            dims = [d for d in range(x.dim()) if d != 1]
            entry = [x.sum(dims), (x * x).sum(dims), torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64,
                                                                   device=x.device)]
            if index in stats:
                if stats[index][0].numel() != entry[0].numel():
                    raise RuntimeError(f"BN layer {index} saw {entry[0].numel()} channels after "
                                       f"{stats[index][0].numel()}: the active arch changed during recalibration")
                for acc, new in zip(stats[index], entry):
                    acc += new
            else:
                stats[index] = entry

        return hook

    training = {m: m.training for m in model.modules()}
    saved = {bn: (bn.momentum, bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None)
             for bn in bns}
    handles = [bn.register_forward_pre_hook(make_hook(i)) for i, bn in enumerate(bns)]
    num_samples = 0
    try:
        model.eval()
        for bn in bns:
            bn.train()
            bn.momentum = 0.0  # normalise with batch stats, leave running stats alone during the pass
        device = next(model.parameters()).device
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            x = _input_of(batch).to(device)
            num_samples += x.shape[0]
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag
        for bn, (momentum, tracked) in saved.items():
            bn.momentum = momentum
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked)

    layout = [(i, stats[i][0].numel()) for i in sorted(stats)]
    if dist.is_available() and dist.is_initialized():
        layouts = [None] * dist.get_world_size(group)
        dist.all_gather_object(layouts, layout, group=group)
        non_empty = [lo for lo in layouts if lo]
        if any(lo != non_empty[0] for lo in non_empty):
            raise RuntimeError(f"BN recalibration: ranks ran different subnets (layer, channels): {layouts}")
        layout = non_empty[0] if non_empty else []
    device = next(model.parameters()).device
    pieces = []
    for index, channels in layout:
        entry = stats.get(index) or [torch.zeros(channels, dtype=torch.float64, device=device)] * 2 + [
            torch.zeros(1, dtype=torch.float64, device=device)
        ]
        pieces += entry
    pieces.append(torch.tensor([float(num_samples)], dtype=torch.float64, device=device))
    flat = torch.cat([p.to(device) for p in pieces])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, group=group)

    offset = 0
    for index, channels in layout:
        total = flat[offset : offset + channels]
        total_sq = flat[offset + channels : offset + 2 * channels]
        count = flat[offset + 2 * channels].item()
        offset += 2 * channels + 1
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0.0)
        if count > 1:
            var = var * (count / (count - 1))
        bn = bns[index]
        bn.running_mean[:channels] = mean.to(bn.running_mean.dtype)
        bn.running_var[:channels] = var.to(bn.running_var.dtype)
    return int(flat[-1].item())
