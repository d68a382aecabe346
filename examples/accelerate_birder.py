"""Birder in Hugging Face Accelerate: keep a handle on Birder, ``prepare``, then attach it to the DDP model.

``accelerator.prepare(model, optimizer)`` wraps the model in DistributedDataParallel and the
optimizer in an ``AcceleratedOptimizer``; the one added line, ``attach(model, optimizer)`` from
:mod:`dist_supernet.integrations.accelerate`, attaches the Birder inside to the wrapped model.
Accelerate's habits keep working:
``accelerator.accumulate(model)`` uses ``no_sync()`` (one 1-bit exchange per optimizer step),
``accelerator.clip_grad_norm_`` clips this rank's own gradient (it cannot rescale Birder's update),
and ``mixed_precision="bf16"`` autocasts. On one process (no DDP wrap) there is nothing to attach
and Birder runs locally.

Example::
    torchrun --standalone --nproc_per_node=2 examples/accelerate_birder.py --max-steps 100
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dist_supernet import Birder
from dist_supernet.integrations.accelerate import attach


def digits_loader(batch_size=32, seed=0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def make_model():
    return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 10))


def train(max_steps=100, lr=3e-3, weight_decay=0.1, accumulate=2, clip=1.0, mixed_precision="no", seed=0):
    """Train the digits MLP; returns (accelerator, model, birder, losses)."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate, mixed_precision=mixed_precision)
    torch.manual_seed(seed)
    model = make_model()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    birder = Birder([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                    lr=lr)  # was: torch.optim.AdamW(...)
    model, optimizer, loader = accelerator.prepare(model, birder, digits_loader(seed=seed))
    attach(model, optimizer)  # the one added line: the 1-bit exchange replaces DDP's fp32 all-reduce
    losses, step = [], 0
    while step < max_steps:
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                losses.append(loss.item())
                step += 1
                if step == max_steps:
                    break
    return accelerator, model, birder, losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--mixed-precision", default="no", help="or bf16")
    args = parser.parse_args()
    accelerator, _, birder, losses = train(args.max_steps, args.lr, accumulate=args.accumulate,
                                           mixed_precision=args.mixed_precision)
    stats = birder.comm_stats.snapshot()
    if accelerator.is_main_process:
        print(f"train loss {losses[0]:.4f} -> {sum(losses[-10:]) / 10:.4f} (last 10), hooked {birder.hooked}, "
              f"steps {birder.num_steps}, bytes {stats['bytes_total']} in {stats['num_exchanges']} exchanges")
    accelerator.end_training()


if __name__ == "__main__":
    main()
