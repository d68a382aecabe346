"""A DDP training script written the way popular ones are (nanoGPT's habits), with a Birder switch.

The habits it keeps, because that is where swap-in optimizers break:
- the optimizer is built from decay / no-decay param groups of the bare model, BEFORE the DDP wrap;
- gradient accumulation toggles ``model.require_backward_grad_sync`` (sync on the last micro-step);
- ``clip_grad_norm_(model.parameters(), 1.0)`` every step, after ``scaler.unscale_``;
- optional fp16 autocast with ``torch.amp.GradScaler`` (or bf16 autocast without one);
- the lr is set per iteration in every ``param_group`` (warm-up + cosine);
- ``optimizer.state_dict()`` is saved on rank 0 only, and every rank resumes from that file.

``--optimizer birder`` changes one line (the optimizer's) and adds one (``optimizer.attach(model)``
after the DDP wrap); everything else is the same code for both optimizers.

The task: a tiny transformer classifying scikit-learn's bundled 8x8 digits (each image row is a
token), so it runs on CPU in seconds and needs no download.

Example::
    torchrun --standalone --nproc_per_node=2 examples/ddp_client.py --optimizer birder --lr 3e-3
    torchrun --standalone --nproc_per_node=2 examples/ddp_client.py --optimizer adamw --lr 3e-3
    torchrun --standalone --nproc_per_node=2 examples/ddp_client.py --optimizer birder --dtype float16
"""

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_supernet import Birder

# -- config (nanoGPT keeps these at the top; here they are flags so runs can be compared) ---------------
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--optimizer", choices=["birder", "adamw"], default="birder")
parser.add_argument("--lr", type=float, default=3e-3, help="peak lr (warm-up then cosine to lr/10)")
parser.add_argument("--weight-decay", type=float, default=0.1, help="2-D weights only (nanoGPT's split)")
parser.add_argument("--max-iters", type=int, default=300)
parser.add_argument("--warmup-iters", type=int, default=30)
parser.add_argument("--batch-size", type=int, default=32, help="per rank and micro-step")
parser.add_argument("--grad-accum", type=int, default=2, help="micro-steps per optimizer step")
parser.add_argument("--grad-clip", type=float, default=1.0, help="0 turns clipping off")
parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="autocast dtype; float16 adds a GradScaler")
parser.add_argument("--compile", action="store_true", help="torch.compile(model) before the DDP wrap")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--save-at", type=int, default=0, help="save a checkpoint (rank 0 only) after this iteration")
parser.add_argument("--ckpt", default="ckpt.pt", help="checkpoint file for --save-at and --resume")
parser.add_argument("--resume", action="store_true", help="every rank loads --ckpt and continues")
parser.add_argument("--overflow-at", type=int, default=-1,
                    help="inject an inf into the loss of rank --overflow-rank at this iteration (fp16 test)")
parser.add_argument("--overflow-rank", type=int, default=1)
parser.add_argument("--out", default="", help="write the summary as JSON here (rank 0)")
args = parser.parse_args()

# -- DDP set-up (torchrun's environment) ------------------------------------------------------------------
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group("gloo")  # CPU; use "nccl" and device_ids=[local_rank] on GPUs
    rank, world_size = dist.get_rank(), dist.get_world_size()
else:
    rank, world_size = 0, 1
master = rank == 0
torch.manual_seed(args.seed)  # same init on every rank (DDP broadcasts rank 0's anyway)
torch.set_num_threads(1)  # 2 processes on a small CPU: one thread each


# -- data: sklearn's digits, 8 tokens (rows) of 8 pixels ---------------------------------------------------
def load_digits_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [N, 8, 8] in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # fixed split for all seeds
    num_val = len(y) // 5
    return (x[order[num_val:]], y[order[num_val:]]), (x[order[:num_val]], y[order[:num_val]])


(train_x, train_y), (val_x, val_y) = load_digits_split()


def get_batch(it, micro):
    # Keyed by (seed, rank, iteration, micro-step), so a resumed run sees the same batches.
    gen = torch.Generator().manual_seed(((args.seed * 1_000_003 + it) * 64 + micro) * 257 + rank)
    idx = torch.randint(len(train_y), (args.batch_size,), generator=gen)
    return train_x[idx], train_y[idx]


# -- model: a tiny pre-LN transformer --------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class DigitFormer(nn.Module):
    def __init__(self, dim=64, heads=4, layers=2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x, y=None):
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.ln_f(h).mean(dim=1))
        return logits, (None if y is None else F.cross_entropy(logits.float(), y))

    def configure_optimizers(self, optimizer, weight_decay, lr):
        # nanoGPT: 2-D tensors (matmuls) decay, biases, LayerNorms and the position table do not.
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2 and p is not self.pos]
        no_decay = [p for p in params if not (p.dim() >= 2 and p is not self.pos)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
        return Birder(groups, lr=lr)  # the one changed line (betas: Birder's beta=0.9 default)


model = DigitFormer()
num_params = sum(p.numel() for p in model.parameters())
optimizer = model.configure_optimizers(args.optimizer, args.weight_decay, args.lr)  # BEFORE the wrap
dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
scaler = torch.amp.GradScaler("cpu", enabled=args.dtype == "float16")
start_iter = 0
if args.resume:  # every rank loads the file rank 0 saved
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])  # Birder: rank 0's m, b on every rank (it warns)
    scaler.load_state_dict(ckpt["scaler"])
    start_iter = ckpt["iter"] + 1
if args.compile:
    model = torch.compile(model)
raw_model = model._orig_mod if args.compile else model
if ddp:
    model = DDP(model)
    if args.optimizer == "birder":
        optimizer.attach(model)  # the one added line: the 1-bit exchange replaces DDP's fp32 all-reduce


def get_lr(it):
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.lr / 10)


@torch.no_grad()
def evaluate():
    raw_model.eval()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits, loss = raw_model(val_x, val_y)
    raw_model.train()
    return loss.item(), (logits.argmax(dim=1) == val_y).float().mean().item()


def flat_params():
    return torch.cat([p.detach().reshape(-1) for p in raw_model.parameters()])


# -- training loop --------------------------------------------------------------------------------------
scales, skipped_iters, train_losses = [], [], []
t0 = time.time()
for it in range(start_iter, args.max_iters):
    lr = get_lr(it)
    for group in optimizer.param_groups:
        group["lr"] = lr
    before = flat_params() if it == args.overflow_at else None
    for micro in range(args.grad_accum):
        if ddp:
            # nanoGPT's accumulation: only the last micro-step's backward exchanges gradients.
            model.require_backward_grad_sync = micro == args.grad_accum - 1
        x, y = get_batch(it, micro)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, y)
            loss = loss / args.grad_accum
        if it == args.overflow_at and rank == args.overflow_rank and micro == args.grad_accum - 1:
            loss = loss * float("inf")  # an fp16 overflow on one rank only
        scaler.scale(loss).backward()
    if args.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scales.append(scaler.get_scale() if scaler.is_enabled() else 1.0)
    if before is not None and torch.equal(before, flat_params()):
        skipped_iters.append(it)
    train_losses.append(loss.item() * args.grad_accum)
    if master and (it % 50 == 0 or it == args.max_iters - 1):
        print(f"iter {it}: loss {train_losses[-1]:.4f}, lr {lr:.2e}, scale {scales[-1]:g}", flush=True)
    if args.save_at and it == args.save_at and master:  # rank 0 only, as nanoGPT does
        torch.save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "iter": it, "args": vars(args)}, args.ckpt)
elapsed = time.time() - t0

# -- summary --------------------------------------------------------------------------------------------
val_loss, val_acc = evaluate()
steps = args.max_iters - start_iter
summary = {"optimizer": args.optimizer, "lr": args.lr, "seed": args.seed, "dtype": args.dtype,
           "grad_clip": args.grad_clip, "world_size": world_size, "num_params": num_params, "steps": steps,
           "val_loss": val_loss, "val_acc": val_acc,
           "train_loss_first": train_losses[0] if train_losses else None,
           "train_loss_last10": sum(train_losses[-10:]) / max(1, len(train_losses[-10:])), "time_s": elapsed}
if args.optimizer == "birder":
    stats = optimizer.comm_stats.snapshot()
    summary.update(bytes_total=stats["bytes_total"], num_exchanges=stats["num_exchanges"],
                   hooked=optimizer.hooked, birder_steps=optimizer.num_steps,
                   birder_skipped_steps=optimizer.skipped_steps)
    if args.resume:  # the byte counters restart: rank 0's were saved, this rank's are per rank
        summary["bytes_note"] = "counters include the saved run's (rank 0's counters restored on rank 0)"
    per_step = stats["bytes_total"] / max(1, stats["num_exchanges"])
    summary.update(bytes_per_param_step=per_step / num_params, fp32_ratio=4.0 * num_params / max(per_step, 1e-9))
if ddp:
    # Replicas in sync: every rank's parameters bit for bit; the scale history the same everywhere.
    mine = flat_params()
    rows = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(rows, mine)
    summary["replicas_in_sync"] = all(torch.equal(rows[0], row) for row in rows)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, {"scales": scales, "skipped": skipped_iters})
    summary["scales_equal_on_all_ranks"] = all(g["scales"] == gathered[0]["scales"] for g in gathered)
    summary["skipped_iters_per_rank"] = [g["skipped"] for g in gathered]
if scaler.is_enabled():
    summary.update(scale_first=scales[0], scale_last=scales[-1], scale_min=min(scales))
if master:
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
if ddp:
    dist.destroy_process_group()
