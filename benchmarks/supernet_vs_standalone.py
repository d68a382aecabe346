"""Does weight sharing cost the two ends of the space accuracy? Supernet max/min vs the same archs trained alone.

Three runs of the training application per seed, each ``torchrun --standalone
--nproc_per_node=2 -m dist_supernet.train``, with the same optimizer,
compression (default: Birder, 1 bit per element), data (digits, test split
reported), batch, LR schedule and step budget:

- ``supernet``: the default main job (``model=ofa_cnn supernet=sandwich``: max +
  min + 2 random subnets per step, in-place distillation); its ``subnets.json``
  gives the max and the min subnet's test accuracy after BN recalibration;
- ``standalone max`` / ``standalone min``: ``model=subnet model.arch=max|min``,
  the same architecture as a plain module, initialised as the fresh
  supernet's slice (``export_subnet``), trained alone; test accuracy from its
  ``summary.json`` (its own BN running stats).

"Same steps" means the same number of optimizer steps and batches: within
one supernet step the max and the min subnet each see the batch once, as
they do in a standalone step (plus two random subnets and distillation).
The supernet's search is cut to a token size (it is not what this compares).
``--overrides`` change every run (``compression=none optim=adamw``: DDP fp32 +
AdamW); ``--supernet-overrides`` only the supernet (a recipe lever), so one
standalone baseline serves every lever (it is trained once per overrides,
steps and seed, and reused).

Usage::

    python benchmarks/supernet_vs_standalone.py                  # 300 steps, seed 0: ~3 min on 2 busy cores
    python benchmarks/supernet_vs_standalone.py --steps 1000 --seeds 0 1 2 --tag birder_1000
    python benchmarks/supernet_vs_standalone.py --overrides compression=none optim=adamw --tag adamw
    python benchmarks/supernet_vs_standalone.py --supernet-overrides supernet.distillation.weight=0.5 --tag kd05
    python benchmarks/supernet_vs_standalone.py --quick          # 10 steps, smoke

Writes ``benchmarks/results/supernet_vs_standalone_<date>[_<tag>].md`` (and ``.json``);
the runs stay in ``outputs/supernet_vs_standalone_<date>/``.
"""

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import common
from common import REPO
RUN_TIMEOUT_S = 1800
# The supernet run's search only has to produce its report; max and min are scored regardless.
TOKEN_SEARCH = ["supernet.search.population_size=4", "supernet.search.num_generations=0"]


def torchrun(run_dir: Path, overrides: list[str]) -> float:
    """One training-application job on 2 local processes; returns its wall time in seconds."""
    cmd = common.torchrun_command(2, "-m", "dist_supernet.train", *overrides, f"hydra.run.dir={run_dir}")
    return common.run_logged(cmd, run_dir.parent / f"{run_dir.name}.log", timeout_s=RUN_TIMEOUT_S,
                             env=common.repo_env(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1"))


def _key(overrides: list[str]) -> str:
    """A short stable name for a set of overrides: a run is trained once and reused by every table that needs it."""
    return hashlib.sha256(" ".join(sorted(overrides)).encode()).hexdigest()[:10]


def run_seed(root: Path, seed: int, steps: int, overrides: list[str], supernet_overrides: list[str]) -> list[dict]:
    """The three runs of one seed; one row per (subnet, how it was trained).

    ``overrides`` go to every run (optimizer, compression, data); ``supernet_overrides`` only to the
    supernet (recipe levers: sampler, distillation, model init). A standalone run with the same
    overrides, steps and seed is trained once and reused from ``root/../standalone`` (supernet runs
    likewise from ``root/../supernet``): delete a run directory to retrain it.
    """
    every_run = [f"trainer.max_steps={steps}", f"trainer.seed={seed}", "trainer.eval_every=0",
              "trainer.checkpoint_every=0", "trainer.log_every=50", *overrides]
    rows = []
    sup_cmd = [*every_run, *TOKEN_SEARCH, *supernet_overrides]
    run_dir = root.parent / "supernet" / f"{_key(sup_cmd)}_seed{seed}"
    job_s = 0.0
    if not (run_dir / "subnets.json").is_file():
        job_s = torchrun(run_dir, sup_cmd)
    summary = json.loads((run_dir / "summary.json").read_text())
    report_file = json.loads((run_dir / "subnets.json").read_text())
    report = {e["name"]: e for e in report_file["subnets"]}
    split = report_file.get("accuracy_split", "val")
    for name in ("max", "min"):
        e = report[name]
        rows.append({"seed": seed, "subnet": name, "trained": "supernet", "accuracy": e["accuracy"],
                     "split": split, "val_accuracy": e.get("val_accuracy", e["accuracy"]),
                     "flops": e["flops"], "params": e["params"], "train_wall_s": summary["wall_time_s"],
                     "job_wall_s": round(job_s, 1), "bytes_sent": summary["bytes_sent_total"],
                     "run_dir": str(run_dir.relative_to(REPO))})
    print(f"  seed {seed} supernet: max {report['max']['accuracy']:.4f}, min {report['min']['accuracy']:.4f} "
          f"({split}; {summary['wall_time_s']:.0f} s training{', reused' if not job_s else ''})", flush=True)
    for name in ("max", "min"):
        alone_cmd = [*every_run, "model=subnet", f"model.arch={name}"]
        run_dir = root.parent / "standalone" / f"{name}_{_key(alone_cmd)}_seed{seed}"
        job_s = 0.0
        if not (run_dir / "summary.json").is_file():
            job_s = torchrun(run_dir, alone_cmd)
        summary = json.loads((run_dir / "summary.json").read_text())
        accuracy = summary.get("test_accuracy", summary["eval_accuracy"])
        rows.append({"seed": seed, "subnet": name, "trained": "standalone", "accuracy": accuracy,
                     "split": "test" if "test_accuracy" in summary else "val",
                     "val_accuracy": summary["eval_accuracy"],
                     "flops": report[name]["flops"], "params": summary["num_params"],
                     "train_wall_s": summary["wall_time_s"], "job_wall_s": round(job_s, 1),
                     "bytes_sent": summary["bytes_sent_total"], "run_dir": str(run_dir.relative_to(REPO))})
        print(f"  seed {seed} standalone {name}: {accuracy:.4f} ({summary['wall_time_s']:.0f} s training"
              f"{', reused' if not job_s else ''})", flush=True)
    return rows


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def table(rows: list[dict]) -> str:
    """Markdown: per subnet, supernet vs standalone accuracy (mean ± std over seeds), gap in points, cost."""
    lines = ["| subnet | MFLOPs | params (exported) | supernet, after BN recal. (%) | standalone (%) | "
             "supernet − standalone (points) | training s, supernet / standalone | MiB sent, supernet / standalone |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("max", "min"):
        sup = [r for r in rows if r["subnet"] == name and r["trained"] == "supernet"]
        alone = [r for r in rows if r["subnet"] == name and r["trained"] == "standalone"]
        gaps = [100 * (s["accuracy"] - a["accuracy"]) for s, a in zip(sup, alone)]
        gap = f"{gaps[0]:+.2f}" if len(gaps) == 1 else f"{statistics.mean(gaps):+.2f} ± {statistics.stdev(gaps):.2f}"
        lines.append(
            f"| {name} | {sup[0]['flops'] / 1e6:.3f} | {sup[0]['params']} | {_mean_std([r['accuracy'] for r in sup])} "
            f"| {_mean_std([r['accuracy'] for r in alone])} | {gap} "
            f"| {statistics.median(r['train_wall_s'] for r in sup):.0f} / "
            f"{statistics.median(r['train_wall_s'] for r in alone):.0f} "
            f"| {statistics.median(r['bytes_sent'] for r in sup) / 2**20:.2f} / "
            f"{statistics.median(r['bytes_sent'] for r in alone) / 2**20:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (default: the main job's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="Hydra overrides for every run, e.g. compression=none optim=adamw")
    parser.add_argument("--supernet-overrides", nargs="*", default=[],
                        help="Hydra overrides for the supernet run only (recipe levers), e.g. supernet.distillation.weight=0.5")
    parser.add_argument("--tag", default="", help="suffix of the result files (one file per compared setting)")
    parser.add_argument("--quick", action="store_true", help="10 steps, one seed: a smoke test")
    args = parser.parse_args()
    steps, seeds = (10, [0]) if args.quick else (args.steps, args.seeds)
    date = common.today()
    root = REPO / "outputs" / f"supernet_vs_standalone_{date}" / (args.tag or "default")
    root.mkdir(parents=True, exist_ok=True)
    load_before = common.load_average()[0]
    cpu = common.cpu_name()
    start = time.perf_counter()
    rows = []
    for seed in seeds:
        rows += run_seed(root, seed, steps, args.overrides, args.supernet_overrides)
    total_s = time.perf_counter() - start
    command = "python benchmarks/supernet_vs_standalone.py" + (
        " --quick" if args.quick else f" --steps {steps} --seeds {' '.join(map(str, seeds))}")
    if args.overrides:
        command += " --overrides " + " ".join(args.overrides)
    if args.supernet_overrides:
        command += " --supernet-overrides " + " ".join(args.supernet_overrides)
    if args.tag:
        command += f" --tag {args.tag}"
    split = rows[0]["split"]
    text = "\n".join([
        f"# Supernet vs standalone: max and min subnets, {steps} steps ({date}{', ' + args.tag if args.tag else ''})",
        "",
        f"Command: `{command}` ({total_s / 60:.1f} min; runs already trained with the same overrides, "
        f"steps and seed are reused). Machine: {cpu}, {os.cpu_count()} cores shared with other users "
        f"(1-min load average {load_before:.1f} at the start), torch CPU, 2 gloo processes.",
        "",
        "Every run: the default `conf/` (digits: train / val / test split, batch 32 per rank, default optimizer "
        "and compression) with these overrides for every run: "
        f"`{' '.join(args.overrides) or '(none)'}`; for the supernet only: "
        f"`{' '.join(args.supernet_overrides) or '(none)'}`. Supernet: `model=ofa_cnn supernet=sandwich`; its "
        "max / min subnet after BN recalibration (`subnets.json`). Standalone: `model=subnet model.arch=max|min`, "
        "initialised as a fresh supernet's slice, its own BN running stats (`summary.json`). "
        f"Accuracy on the {split} split. Seeds: {', '.join(map(str, seeds))}"
        + (" (mean ± sample std)." if len(seeds) > 1 else "."),
        "",
        table(rows),
        "",
        "Training seconds are the trainer's wall time (without start-up and the supernet's report); on a shared "
        "machine they are noisy. A supernet step runs 4 subnets, so it costs about 4 standalone max steps of "
        "compute but trains the whole space at once; the bytes differ because the supernet's exchange "
        "covers all of its parameters every step.",
        "",
    ])
    out = common.results_path("supernet_vs_standalone", "", date=date, tag=args.tag)
    common.write_results(out, text, {"command": command, "steps": steps, "seeds": seeds, "overrides": args.overrides,
                                     "supernet_overrides": args.supernet_overrides, "load_average_start": load_before,
                                     "cpu": cpu, "rows": rows}, indent=2)
    print(text)
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
