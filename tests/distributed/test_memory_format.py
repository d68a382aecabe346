"""Birder on channels_last parameters (issue 11): DDP lays their gradients in memory order (NHWC).

With beta = 0, r = sign(g) exactly, so the bits do not depend on the random draws (nor on which
canonical index an element gets): a channels_last model must then train to exactly the parameters of
the same model in the default layout, masks given in logical order must freeze the same elements,
and m, b (shaped and strided like the parameter) must hold the same values (to rounding: the conv's
backward sums in another order in NHWC).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_supernet import Birder
from tests.distributed.harness import run_workers


def _model(channels_last):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _run(rank, channels_last):
    model = _model(channels_last)
    ddp = DDP(model, bucket_cap_mb=0.001)
    opt = Birder(ddp, lr=0.01, beta=0.0, weight_decay=0.1, seed=1)
    conv = model[0].weight
    mask = torch.zeros_like(conv, dtype=torch.bool, memory_format=torch.contiguous_format)
    mask[:, :, 1, :] = True  # logical: only the middle row of every 3x3 kernel may move
    before = conv.detach().clone()
    for step in range(4):
        gen = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(4, 3, 6, 6, generator=gen)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = torch.randint(0, 3, (4,), generator=gen)
        opt.set_grad_mask({conv: mask})
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    moved = (conv.detach() != before)
    return {
        "params": [p.detach().contiguous().clone() for p in model.parameters()],
        "m": [opt.state[p]["m"].contiguous().clone() for p in model.parameters()],
        "only_masked_moved": bool(moved[~mask].sum() == 0) and bool(moved[mask].any()),
        "state_strided_like_param": opt.state[conv]["m"].stride() == conv.stride(),
    }


def _worker(rank, world_size):
    plain, strided = _run(rank, False), _run(rank, True)
    flat = torch.cat([p.reshape(-1) for p in strided["params"]])
    rows = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(rows, flat)
    return {
        "params_equal": all(torch.equal(a, b) for a, b in zip(plain["params"], strided["params"])),
        # m = g here; the conv's backward sums in another order in NHWC, so equal to rounding only.
        "m_close": all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(plain["m"], strided["m"])),
        "only_masked_moved": plain["only_masked_moved"] and strided["only_masked_moved"],
        "state_strided_like_param": strided["state_strided_like_param"],
        "replicas_identical": all(torch.equal(rows[0], r) for r in rows),
    }


def test_channels_last_parameters_train_like_contiguous_ones():
    for rank, checks in enumerate(run_workers(_worker, 2, timeout_s=120)):
        failed = [name for name, ok in checks.items() if not ok]
        assert not failed, f"rank {rank}: {failed}"
