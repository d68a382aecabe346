"""Birder in PyTorch Lightning: ``configure_optimizers`` returns Birder, the library's strategy attaches it.

The two changed lines are marked ``was:`` below; why a ``DDPStrategy`` subclass and what keeps
working (clipping, accumulation, bf16): :mod:`dist_supernet.integrations.lightning`.

Example::
    torchrun --standalone --nproc_per_node=2 examples/lightning_birder.py --max-steps 100
"""

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dist_supernet import Birder
from dist_supernet.integrations.lightning import BirderDDPStrategy


class DigitsClassifier(pl.LightningModule):
    """An MLP on scikit-learn's bundled 8x8 digits, with nanoGPT's decay / no-decay param groups."""

    def __init__(self, lr=3e-3, weight_decay=0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return Birder(groups, lr=self.hparams.lr)  # was: torch.optim.AdamW(groups, lr=...)


def digits_loader(batch_size=32, seed=0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    # Lightning adds a DistributedSampler: every rank gets its own shard.
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def make_trainer(max_steps, *, devices=2, accumulate=1, clip=1.0, precision="32-true", root_dir="."):
    return pl.Trainer(
        accelerator="cpu", devices=devices, num_nodes=1, max_steps=max_steps,
        strategy=BirderDDPStrategy(process_group_backend="gloo"),  # was: strategy="ddp"
        accumulate_grad_batches=accumulate, gradient_clip_val=clip, precision=precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root_dir,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--precision", default="32-true", help="or bf16-mixed")
    args = parser.parse_args()
    pl.seed_everything(0)
    model = DigitsClassifier(lr=args.lr)
    trainer = make_trainer(args.max_steps, accumulate=args.accumulate, precision=args.precision)
    trainer.fit(model, digits_loader())
    optimizer = trainer.optimizers[0]
    stats = optimizer.comm_stats.snapshot()
    if trainer.is_global_zero:
        print(f"final train_loss {float(trainer.callback_metrics['train_loss']):.4f}, hooked {optimizer.hooked}, "
              f"steps {optimizer.num_steps}, bytes {stats['bytes_total']} in {stats['num_exchanges']} exchanges")


if __name__ == "__main__":
    main()
