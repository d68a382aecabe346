"""What does the replica check cost, against the step time (the default of ``trainer.sync_check_every``)?

**Question.** :class:`~dist_supernet.train.replicas.ReplicaCheck` (a checksum of every
parameter, one all-reduce of 2 int64 per parameter, one host sync) runs every
``trainer.sync_check_every`` steps. Its default must cost under 1% of the step
time on the default job (the OFA supernet, README command 1) and on ``model=mlp``
(the cheapest step there is, so the check weighs most).

**Method.** Per model, ``torchrun --standalone --nproc_per_node=2`` (gloo on
loopback, 1 thread each, as README command 1) with ``trainer.sync_check_every=1``
(a check after every step), a metrics row per step, no evaluation and no
checkpoint while training. The trainer times each check (wall time of
``check()``: the checksum, the all-reduce and its wait for the slower rank, the
host sync) and writes the total to ``summary.json`` (``sync_checks``). The step
time is the median of Δwall_time_s/Δstep over the metrics rows minus that
per-check cost (each row's step includes one check). Per check ÷ 1% of a step
is the smallest interval that keeps the check under 1%. Repeats: medians, with
the range.

Run from the repository root::

    python benchmarks/sync_check_cost.py                    # mlp 300 steps, supernet 60 steps, 3 repeats (~4 min)
    python benchmarks/sync_check_cost.py --repeats 1 --mlp-steps 50 --supernet-steps 10 --out /tmp/x   # smoke
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

JOBS = {
    "mlp": ["model=mlp"],
    # README command 1's model and sampler (sandwich: 4 subnets per step), with a minimal search afterwards.
    "supernet (default job)": ["model=ofa_cnn", "supernet=sandwich", "supernet.search.population_size=4",
                               "supernet.search.num_generations=1", "supernet.bn_recalibration.num_batches=1"],
}


def measure(name: str, overrides: list[str], steps: int, workdir: Path) -> dict:
    run_dir = workdir / name.split()[0]
    cmd = common.torchrun_command(2, "-m", "dist_supernet.train", *overrides, f"trainer.max_steps={steps}",
                                  "trainer.sync_check_every=1", "trainer.log_every=1", "trainer.eval_every=0",
                                  "trainer.checkpoint_every=0", f"hydra.run.dir={run_dir}")
    common.run_logged(cmd, workdir / f"{name.split()[0]}.log", timeout_s=1800,
                      env=common.repo_env(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1"))
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    deltas = [(b["wall_time_s"] - a["wall_time_s"]) / (b["step"] - a["step"]) for a, b in zip(rows, rows[1:])]
    checks = summary["sync_checks"]
    per_check = checks["seconds"] / checks["num_checks"]
    step = statistics.median(deltas) - per_check
    return {"per_check_s": per_check, "step_s": step, "num_checks": checks["num_checks"],
            "num_params": summary["num_params"], "ratio": per_check / step}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mlp-steps", type=int, default=300)
    parser.add_argument("--supernet-steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    machine = common.machine_description()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in JOBS.items():
            steps = args.mlp_steps if name == "mlp" else args.supernet_steps
            results[name] = [measure(name, overrides, steps, Path(tmp) / f"r{r}") for r in range(args.repeats)]
            print(name, results[name], flush=True)
    lines = [f"# Replica check cost ({common.today()})", "",
             f"`{common.command_line('sync_check_cost.py', argv)}`; {machine['cpu']}, {machine['cores']} cores, "
             f"torch {machine['torch']}, load average {machine['load_avg_1min_at_start']} at the start, "
             f"{common.load_average()[0]:.2f} at the end. 2 gloo processes on loopback, 1 thread each.", "",
             "| job | params | check (ms) | step (ms) | check / step | interval for < 1% |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, runs in results.items():
        check = common.median_range(r["per_check_s"] * 1e3 for r in runs)
        step = common.median_range(r["step_s"] * 1e3 for r in runs)
        ratio = common.median_range(r["ratio"] for r in runs)
        lines.append(f"| {name} | {runs[0]['num_params']:,} | {check[0]:.3f} ({check[1]:.3f}-{check[2]:.3f}) | "
                     f"{step[0]:.1f} ({step[1]:.1f}-{step[2]:.1f}) | {100 * ratio[0]:.2f}% "
                     f"({100 * ratio[1]:.2f}-{100 * ratio[2]:.2f}%) | >= {math.ceil(100 * ratio[2])} |")
    lines += ["", "check = wall time of one `ReplicaCheck.check()` on rank 0 (checksum, all-reduce with the wait for "
              "the slower rank, host sync); step = median Δwall_time_s/Δstep minus one check; the interval column "
              "uses the worst repeat.", ""]
    stem = args.out or common.results_path("sync_check_cost", "", hardware=machine["cpu"])
    common.write_results(stem, "\n".join(lines), {"machine": machine, "results": results})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
