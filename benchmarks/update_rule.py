"""Birder's update rule against AdamW with the exchange taken out: where does the quality gap come from?

One process simulates ``--workers`` data-parallel workers on the small GPT of ``experiment=gpt_small``
(each worker its own batches, its own m and b, as under the 1-bit hook); every variant sees the same
batches, the same initial weights and the same lr schedule (linear warm-up, cosine to 0), so the rows
differ by the rule alone. Loss only: no timing, so variants may run side by side.

Variants (``--variants``, comma-separated ``NAME@LR``):

- ``adamw``: torch's AdamW on the averaged gradient, betas (0.9, 0.99), ``--clip`` on the global norm
  (the time-to-accuracy benchmark's AdamW recipe);
- ``adam_noclip``: the same without clipping;
- ``abs`` / ``rms``: Birder's rule, per worker, with the paper's normaliser (b = EMA |g|) or the
  second-moment one (b = EMA g^2 with ``--beta2``, bias-corrected), the worker's ratio r sent as one
  random bit (``Birder``'s draw: +1 with probability (1 + r) / 2) and averaged over the workers;
- suffix ``_exact``: each worker sends r itself instead of a bit (no quantisation noise);
- suffix ``_mean``: one r from the averaged gradient (what ``compression=none optim=birder`` does);
- suffix ``_clip``: each worker's gradient clipped to norm ``--clip`` before it enters m and b (AdamW's
  clipping, per worker); ``_lagclip``: scaled by min(1, clip / the norm of its previous step's gradient),
  which a hook that compresses buckets during backward could apply.

Example::
    python benchmarks/update_rule.py --variants adamw@4e-3,abs@5e-4,abs_exact@5e-4,rms@2e-3 --beta2 0.999
"""

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from dist_supernet.data.text import TextBatches, _windows, load_text  # noqa: E402
from dist_supernet.models.gpt import GPT, GPTConfig  # noqa: E402


def run_variant(name: str, lr: float, a: dict) -> dict:
    """Train one variant for a["steps"] steps; its val-loss curve."""
    torch.set_num_threads(1)
    torch.manual_seed(a["seed"])
    data = load_text()
    model = GPT(GPTConfig(vocab_size=data.vocab_size))
    params = list(model.parameters())
    n = a["workers"]
    batches = [TextBatches(data.train, 128, num_replicas=n, rank=k, batch_size=a["global_batch"] // n, seed=a["seed"])
               for k in range(n)]
    starts = torch.randint(0, len(data.val) - 129, (128,), generator=torch.Generator().manual_seed(1234))
    val_x, val_y = _windows(data.val, starts, 128)
    rule, _, mode = name.partition("_")
    beta, beta2 = a["beta"], (a["beta2"] if rule == "rms" else a["beta"])
    draws = torch.Generator().manual_seed(7 + a["seed"])
    if rule in ("adamw", "adam"):
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    states = [[(torch.zeros_like(p), torch.zeros_like(p)) for p in params] for _ in range(n)]

    def grads(x, y):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        return [p.grad.detach().clone() for p in params]

    def lr_at(t):
        if t < a["warmup"]:
            return lr * (t + 1) / a["warmup"]
        return lr * 0.5 * (1 + math.cos(math.pi * (t - a["warmup"]) / max(1, a["steps"] - a["warmup"])))

    curve = []
    last_norm = [None] * n
    for t in range(a["steps"]):
        per_worker = [grads(*next(batches[k])) for k in range(n)]
        if mode in ("clip", "lagclip") and a["clip"]:
            for k, w in enumerate(per_worker):
                norm = float(torch.sqrt(sum((g * g).sum() for g in w)))
                seen = norm if mode == "clip" else last_norm[k]
                last_norm[k] = norm
                if seen is not None and seen > a["clip"]:
                    per_worker[k] = [g * (a["clip"] / seen) for g in w]
        step_lr = lr_at(t)
        with torch.no_grad():
            if rule in ("adamw", "adam"):
                for i, p in enumerate(params):
                    p.grad = sum(w[i] for w in per_worker) / n
                if rule == "adamw" and a["clip"]:
                    torch.nn.utils.clip_grad_norm_(params, a["clip"])
                opt.param_groups[0]["lr"] = step_lr
                opt.step()
            else:
                debias = (math.sqrt(1 - beta2 ** (t + 1)) if rule == "rms" else 1 - beta2 ** (t + 1)) / (
                    1 - beta ** (t + 1))
                for i, p in enumerate(params):
                    sent = []
                    for k in range(1 if mode == "mean" else n):
                        g = sum(w[i] for w in per_worker) / n if mode == "mean" else per_worker[k][i]
                        m, b = states[k][i]
                        m.mul_(beta).add_(g, alpha=1 - beta)
                        b.mul_(beta2).add_(g * g if rule == "rms" else g.abs(), alpha=1 - beta2)
                        d = b.sqrt() if rule == "rms" else b
                        r = torch.where(b > 0, m * debias / d, torch.zeros_like(m)).clamp(-1, 1)
                        if mode not in ("exact",):
                            r = torch.where(torch.rand(r.shape, generator=draws) < (1 + r) / 2, 1.0, -1.0)
                        sent.append(r)
                    p.sub_(sum(sent) / len(sent), alpha=step_lr)
        if (t + 1) % a["eval_every"] == 0 or t + 1 == a["steps"]:
            with torch.no_grad():
                loss = sum(F.cross_entropy(model(val_x[i:i + 32]).flatten(0, 1), val_y[i:i + 32].flatten()).item()
                           for i in range(0, 128, 32)) / 4
            curve.append([t + 1, round(loss, 4)])
    return {"variant": name, "lr": lr, "curve": curve, "final": curve[-1][1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", required=True, help="comma-separated NAME@LR (see the module docstring)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=32, help="windows of 128 characters per step, all workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999, help="EMA factor of b for the rms rule")
    p.add_argument("--clip", type=float, default=1.0, help="AdamW's gradient clipping (0: none)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--jobs", type=int, default=2, help="variants trained at once (one core each)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    variants = []
    for item in args.variants.split(","):
        name, _, lr = item.partition("@")
        if name.partition("_")[0] not in ("adamw", "adam", "abs", "rms") or not lr:
            p.error(f"--variants: {item!r} is not NAME@LR with NAME adamw, adam_noclip, abs[_exact|_mean] or "
                    "rms[_exact|_mean|_clip|_lagclip]")
        variants.append((name, float(lr)))
    settings = {k: getattr(args, k) for k in ("steps", "workers", "global_batch", "seed", "beta", "beta2", "clip",
                                              "warmup", "eval_every")}
    started = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_variant, *zip(*variants), [settings] * len(variants)))
    info = common.machine_description()
    date = common.today()
    stem = common.results_path("update_rule", "", hardware=info["cpu"], date=date, tag=args.tag)
    command = common.command_line("update_rule.py", argv)
    reference = next((r["final"] for r in rows if r["variant"] == "adamw"), None)
    lines = [f"# Birder's update rule against AdamW, exchange taken out: {info['cpu']}, {date}", "",
             f"Command: `{command}`  ",
             f"Machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, Python {info['python']}, "
             f"torch {info['torch']}; 1-min load average at start {info['load_avg_1min_at_start']}; "
             f"{time.time() - started:.0f} s, {args.jobs} variants at a time (loss only, 1 thread each).  ",
             f"Workload: `experiment=gpt_small` (0.82M parameters), {args.workers} simulated workers, "
             f"{args.global_batch} windows of 128 characters per step, {args.steps} steps, warm-up {args.warmup}, "
             f"cosine to 0, seed {args.seed}; beta {args.beta}, rms beta2 {args.beta2}, AdamW clip {args.clip}. "
             "Val loss on 128 fixed windows.", "",
             "| variant | lr | " + " | ".join(f"step {s}" for s, _ in rows[0]["curve"]) + " | − adamw |",
             "|---|---:|" + "---:|" * len(rows[0]["curve"]) + "---:|"]
    for r in rows:
        diff = "" if reference is None else f"{r['final'] - reference:+.4f}"
        lines.append(f"| {r['variant']} | {r['lr']:g} | " + " | ".join(f"{v:.4f}" for _, v in r["curve"])
                     + f" | {diff} |")
    common.write_results(stem, "\n".join(lines) + "\n",
                         {"date": date, "command": command, "machine": info, "settings": settings, "rows": rows})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
