"""Tune Birder's Triton kernels before the first step on exactly the launches training makes, on dummies.

Triton picks a launch config per key (kernel, size class, dtypes, flags, rows: see
``dist_supernet.kernels.ops._launch``). Tuning benchmarks, which waits for the GPU, so it must
not happen inside backward on the comm thread; and it must not run on the real m, b or
parameters (it reruns each kernel in place). So before training this module replays, once
per DDP bucket shape, the exchange the hook will run:

- the buckets DDP uses in step 1 (one per dtype unless ``find_unused_parameters``) and the
  ones it rebuilds after step 1, predicted from the reverse parameter order, as
  ``(numel, dtype)``: the gradient's dtype is the bucket's;
- compress with the flags the hook passes (the non-finite flag always, the used flags when
  unused parameters are tracked), the collective's own ``_reduce`` with its all-to-all and
  all-gather replaced by local zeros (so the chunk sizes, ``num_rows`` = world size or node
  count, planes and re-quantization are the collective's, and nothing is sent), and the fused
  apply on a dummy parameter of the bucket's dtype;

all inside ``kernels.tuning()``. A launch training makes that this did not predict (a bucket
rebuilt in another order, a grad mask set later) runs its default config and is tuned by
``kernels.tune_missed()`` in the next ``Birder.step``.
"""

import copy
import sys

import torch
import torch.distributed as dist

from dist_supernet import kernels
from dist_supernet.comm.collectives import Packed, whole_chunk_map


def ddp_bucket_shapes(ddp_model, params) -> list:
    """``[(numel, dtype), ...]`` of DDP's step-1 buckets and of its (predicted) rebuilt ones.

    DDP puts every parameter in one bucket per dtype for step 1 unless it looks for unused
    parameters, then rebuilds buckets of ``[first_bucket_bytes, bucket_bytes_cap]`` in the order
    gradients became ready (predicted: reverse parameter order).

    Example::
        >>> ddp_bucket_shapes(ddp_model, list(model.parameters()))   # doctest: +SKIP
        [(530442, torch.float32), (262144, torch.float32), ...]
    """
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        return []
    cap = int(getattr(ddp_model, "bucket_bytes_cap", 25 << 20))
    config = getattr(ddp_model, "_bucket_config", None)  # torch >= 2.12
    first = getattr(config, "first_bucket_bytes_cap", None)
    if first is None:  # torch <= 2.11
        first = dist._DEFAULT_FIRST_BUCKET_BYTES if getattr(ddp_model, "bucket_bytes_cap_default", False) else cap
    bucketing = getattr(ddp_model, "find_unused_parameters", False) and not getattr(ddp_model, "static_graph", False)
    initial = ([first, cap] if first < cap else [cap]) if bucketing else [sys.maxsize]
    shapes = set()
    for order, limits in ((trainable, initial), (trainable[::-1], [first, cap])):
        try:
            buckets, _ = dist._compute_bucket_assignment_by_size(order, limits, [False] * len(order))
        except (AttributeError, RuntimeError, TypeError):  # a private helper of torch's: fall back to one per dtype
            buckets = [[i for i, p in enumerate(order) if p.dtype == dtype] for dtype in {p.dtype for p in order}]
        for bucket in buckets:
            shapes.add((sum(order[i].numel() for i in bucket), order[bucket[0]].dtype))
    return sorted(shapes, key=lambda shape: (shape[0], str(shape[1])))


def dry_run(collective):
    """A copy of ``collective`` whose all-to-all and all-gather return local zeros of the right size (no traffic)."""
    if collective is None:
        return None
    dry = copy.copy(collective)
    dry.all_gather = lambda stage, where, payload, num_rows, group: payload.new_zeros(num_rows * payload.numel())
    dry.all_to_all = lambda stage, where, payload, group: torch.zeros_like(payload)
    return dry


def warm_exchange(compressor, shapes, *, track_unused: bool, device) -> None:
    """Run compress -> collective (dry) -> apply on dummies of each ``(numel, dtype)`` inside ``kernels.tuning()``.

    A no-op unless the device's tensors take the Triton backend. Dummies hold at most
    ``TUNE_NUMEL_CAP`` elements per bucket (larger chunks share one key).

    Example::
        warm_exchange(state.compressor, [(6_553_600, torch.bfloat16)], track_unused=False, device="cuda")
    """
    device = torch.device(device)
    if kernels.backend_for(torch.empty(0, device=device)) != "triton":
        return
    from dist_supernet.kernels.ops import _launch

    collective = dry_run(compressor.collective)
    one = torch.ones(1, device=device)
    with kernels.tuning():
        for numel, dtype in shapes:
            numel = _launch.dummy_numel(numel)
            if numel == 0:
                continue
            starts, canon = whole_chunk_map(numel, device)
            used = torch.ones(1, dtype=torch.uint8, device=device) if track_unused else None
            m = torch.zeros(numel, device=device)
            bits = kernels.compress(torch.zeros(numel, dtype=dtype, device=device), m, torch.zeros_like(m), starts,
                                    canon, beta=compressor.beta, seed=0, amsgrad=compressor.amsgrad, used_P=used,
                                    **compressor.rule_kwargs(0),
                                    flag=torch.zeros(1, dtype=torch.uint8, device=device))
            del m
            if collective is None:
                packed = Packed(bits.view(1, -1), planes=False, num_rows=1)
            else:
                packed = collective.reduce_packed(bits, numel, (starts, canon), seed=0)
            kernels.apply_packed_([torch.zeros(numel, dtype=dtype, device=device)], starts, canon, packed.payload,
                                  planes=packed.planes, num_rows=packed.num_rows, lr_P=one, wd_P=one, used_P=used)
