"""How much sooner does a GPT reach AdamW's validation loss over my link? Loss against wall-clock, every peer in one run.

The user's question (the Birder paper's): on a language model, over a given link, how
long until training reaches the validation loss DDP fp32 + AdamW reaches, and how many
steps does each method need for it. Per link (tc-shaped veth between two network
namespaces = two "nodes", as ``slow_link.py`` builds them; or ``loopback``: one node,
unshaped) and per layout (1 or 2 processes per node), one launch of
``time_to_accuracy_worker.py`` trains every method round-robin from the same
initial weights on the same batches: the app's ``experiment=gpt_small`` (a 0.82M-parameter
GPT on Python's own documentation, character level, 128 characters of context), the same
global batch at every layout (``--global-batch`` windows per step, split over the ranks),
``--steps`` steps, each method with its own lr (``--lr``, or the best of the committed lr
sweep) and the transformer recipe of its optimizer (``RECIPE``).

Methods (``--methods``; ``--method NAME="app overrides"`` adds one):

| method | compression | optimizer |
| --- | --- | --- |
| ``fp32_adamw`` | DDP's fp32 all-reduce (``compression=none``) | AdamW (the reference) |
| ``fp16_adamw`` | torch's fp16 compress hook | AdamW |
| ``powersgd_adamw`` | torch's PowerSGD, rank 4, error feedback, compressing from step 3 | AdamW |
| ``birder`` | Birder's 1-bit exchange, ``collective=auto`` (hierarchical across nodes, allgather on one) | Birder |
| ``hsdp_fp32_adamw`` | FSDP2 inside each node, torch's fp32 HSDP replica all-reduce across nodes | AdamW |
| ``hsdp_birder`` | FSDP2 inside each node, Birder's 1-bit exchange of each shard across nodes | Birder |
| ``compute`` (timing only) | none: DDP fp32 + AdamW with the exchange switched off | AdamW |

PowerSGD on gloo: torch's hook issues its second all-reduce (Q) from the callback of
the first (P)'s future, which on gloo runs on whichever thread completes that future;
with two or more DDP buckets (this GPT has two: DDP's first bucket holds 1 MB) two
ranks can then issue their collectives in different orders, and the job fails at its
first compressed step ("Received data size doesn't match expected size") or hangs.
The project's PowerSGD baseline (``dist_supernet/comm/baselines.py``) finishes each
bucket's P and Q all-reduces before handing the bucket back to DDP on gloo, so every
rank issues them in one order; the cost is the overlap of PowerSGD's exchange with
the rest of backward (a few ms on this model).

Reported per link and layout: median step time, bytes per step and rank (the project's
accounting; the veth's tx counter on shaped links), the **target** = DDP fp32 + AdamW's
val loss at 75% of its steps, each method's **steps** and **training wall time** to
reach it (linear between evaluations; time = the sum of that method's step times, the
slowest rank's each, evaluation excluded), the **speed-up** against DDP fp32 + AdamW,
the ideal speed-up a 32x smaller exchange allows (t_fp32 / (t_compute + (t_fp32 -
t_compute) / 32), from the median step times), and the final val loss; per layout,
over ``--seeds`` (run on the ``--seeds-link``; a run's losses do not depend on the link:
every collective here sums exactly, and the seed-0 runs on the other links are checked
against it), the final val loss (mean ± sample std) and the steps to target. A PNG:
val loss against training wall time, one line per method, a panel per link and layout.

Usage (root, for the namespaces and tc; see benchmarks/README.md)::

    python benchmarks/time_to_accuracy.py --lr-sweep         # per-method lr sweep on loopback: ~20 min on 2 cores
    python benchmarks/time_to_accuracy.py                    # the full run: 3 links x 2 layouts, 3 seeds
    python benchmarks/time_to_accuracy.py --links loopback --layouts 1 --seeds 0 1 2 --tag quality
    python benchmarks/time_to_accuracy.py --quick            # smoke: tiny model, 100mbit + loopback, ~2 min

Writes ``benchmarks/results/time_to_accuracy[_lr_sweep]_<cpu>_<date>[_<tag>].md``, ``.json`` (and ``.png``).
"""

import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
WORKER = HERE / "time_to_accuracy_worker.py"
sys.path.insert(0, str(HERE))
import slow_link  # noqa: E402  (the namespaces, the shaping, the launching)

REFERENCE = "fp32_adamw"
COMPUTE = "compute"
METHODS = {  # name -> the app's overrides for it (more with --method)
    "fp32_adamw": "compression=none optim=adamw",
    "fp16_adamw": "compression=fp16 optim=adamw",
    "powersgd_adamw": "compression=powersgd optim=adamw",
    "birder": "compression=birder optim=birder",
    # FSDP2 inside each node (the model sharded over its ranks), replicated across nodes.
    "hsdp_fp32_adamw": "trainer.parallelism=hsdp compression=none optim=adamw",  # torch's own fp32 HSDP
    "hsdp_birder": "trainer.parallelism=hsdp compression=birder optim=birder",   # 1 bit across nodes
}
TIMING_ONLY = {COMPUTE: "compression=none optim=adamw"}
# The transformer recipe of each optimizer, lr excepted (the lr sweep picks it per method). AdamW: nanoGPT's
# (beta2 0.99 for small character-level models, gradient clipping at 1.0), warm-up over the first 10% of the
# steps, cosine to 0. Birder: the same schedule. See benchmarks/results/time_to_accuracy_quality_*.md.
RECIPE = {
    "adamw": "optim.betas=[0.9,0.99] optim.grad_clip=1.0 optim.weight_decay=0.0",
    "birder": "optim.beta=0.9 optim.weight_decay=0.0",
}
BASE = "experiment=gpt_small"  # the workload: conf/experiment/gpt_small.yaml
DEFAULT_LR_GRID = {"adamw": [1e-3, 2e-3, 4e-3, 8e-3], "birder": [5e-4, 1e-3, 2e-3, 4e-3]}
TARGET_FRACTION = 0.75
RUN_TIMEOUT_S = 3600


def optimizer_of(overrides: str) -> str:
    for part in shlex.split(overrides):
        if part.startswith("optim="):
            return part.split("=", 1)[1]
    return "birder"  # conf/train.yaml's default


def method_overrides(name: str, spec: str, lr: float | None, *, warmup: int) -> str:
    """The app overrides of one method: its compression and optimizer, its optimizer's recipe, its lr."""
    opt = optimizer_of(spec)
    parts = [RECIPE.get(opt, ""), f"optim.warmup_steps={warmup}", spec]  # the method's own settings win
    if lr is not None:
        parts.append(f"optim.lr={lr:g}")
    return " ".join(p for p in parts if p)


def base_overrides(args, nproc_per_node: int, num_nodes: int) -> str:
    world = nproc_per_node * num_nodes
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of the {world} ranks")
    return f"{args.base} trainer.batch_size={args.global_batch // world} {args.extra}".strip()


# -- the analysis -------------------------------------------------------------------------------------------------


def cumulative(times: list[float]) -> list[float]:
    out, total = [0.0], 0.0
    for t in times:
        total += t
        out.append(total)
    return out  # out[s] = training time after s steps


def crossing(evals: list[dict], target: float) -> float | None:
    """The (fractional) step where the val loss first reaches ``target``, linear between evaluations."""
    for a, b in zip(evals, evals[1:]):
        if b["val_loss"] <= target:
            if a["val_loss"] <= target:
                return float(a["step"])
            frac = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return a["step"] + frac * (b["step"] - a["step"])
    return None


def time_at(cum: list[float], step: float) -> float:
    lo = int(math.floor(step))
    if lo >= len(cum) - 1:
        return cum[-1]
    return cum[lo] + (step - lo) * (cum[lo + 1] - cum[lo])


def loss_at(evals: list[dict], step: int) -> float:
    return next(e["val_loss"] for e in evals if e["step"] == step)


def analyse(report: dict) -> dict:
    """Per method of one launch: target, steps and time to it, speed-up, step times, bytes, final loss."""
    steps = report["steps"]
    by_name = {r["method"]: r for r in report["results"]}
    target_step = round(TARGET_FRACTION * steps)
    target = loss_at(by_name[REFERENCE]["evals"], target_step) if REFERENCE in by_name else None
    rows = {}
    for name, r in by_name.items():
        cum = cumulative(r["step_times_s"])
        row = {"method": name, "collective": r["collective"], "lr": r["lr"], "optimizer": r["optimizer"],
               "median_step_s": statistics.median(r["step_times_s"]), "train_time_s": cum[-1],
               "bytes_per_step_per_rank": r["bytes_per_step_per_rank"],
               "wire_tx_bytes_per_step_per_node": r["wire_tx_bytes_per_step_per_node"],
               "params_in_sync": r["params_in_sync"]}
        if r["evals"]:
            row["final_val_loss"] = r["evals"][-1]["val_loss"]
            row["curve"] = [(e["step"], time_at(cum, e["step"]), e["val_loss"]) for e in r["evals"]]
            hit = crossing(r["evals"], target) if target is not None else None
            row["steps_to_target"] = hit
            row["time_to_target_s"] = time_at(cum, hit) if hit is not None else None
        rows[name] = row
    ref = rows.get(REFERENCE, {}).get("time_to_target_s")
    for row in rows.values():
        t = row.get("time_to_target_s")
        row["speedup_vs_fp32_adamw"] = ref / t if ref and t else None
    ideal = None
    if REFERENCE in rows and COMPUTE in rows:
        t32, tc = rows[REFERENCE]["median_step_s"], rows[COMPUTE]["median_step_s"]
        ideal = t32 / (tc + max(0.0, t32 - tc) / 32)
    return {"target": target, "target_step": target_step, "ideal_speedup": ideal, "rows": rows}


def seed_summary(runs: list[dict]) -> dict:
    """Per method over the seeds of one layout: final val loss mean/std, gap to the reference, steps to target."""
    out = {}
    names = [n for n in runs[0]["analysis"]["rows"] if n != COMPUTE]
    for name in names:
        finals = [r["analysis"]["rows"][name]["final_val_loss"] for r in runs]
        gaps = [r["analysis"]["rows"][name]["final_val_loss"] - r["analysis"]["rows"][REFERENCE]["final_val_loss"]
                for r in runs] if all(REFERENCE in r["analysis"]["rows"] for r in runs) else []
        hits = [r["analysis"]["rows"][name]["steps_to_target"] for r in runs]
        out[name] = {
            "seeds": [r["seed"] for r in runs], "final": finals,
            "final_mean": statistics.fmean(finals), "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "gap_mean": statistics.fmean(gaps) if gaps else None,
            "gap_std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
            "steps_to_target": hits,
        }
    return out


# -- the report ----------------------------------------------------------------------------------------------------


def _f(value, fmt: str, none: str = "–") -> str:
    return none if value is None else format(value, fmt)


def link_table(run: dict) -> str:
    a, rep = run["analysis"], run["report"]
    lines = [
        f"### {run['link']}, {rep['num_nodes']} node(s) x {rep['local_world_size']} process(es), seed {run['seed']}",
        "",
        f"Target: DDP fp32 + AdamW's val loss at step {a['target_step']} of {rep['steps']} = **{_f(a['target'], '.4f')}**. "
        f"Ideal speed-up for a 32x smaller exchange: {_f(a['ideal_speedup'], '.2f')}x. "
        f"Load average {run['load_before']:.1f} before, {run['load_after']:.1f} after; launch {run['wall_s']:.0f} s.",
        "",
        "| method | collective | lr | median step ms | accounted KB/step/rank | wire KB/step/node | steps to target | "
        "time to target s | speed-up vs fp32+AdamW | final val loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in a["rows"].items():
        wire = row["wire_tx_bytes_per_step_per_node"]
        lines.append(
            f"| {name} | {row['collective']} | {row['lr']:g} | {row['median_step_s'] * 1e3:.1f} | "
            f"{row['bytes_per_step_per_rank'] / 1e3:.1f} | {_f(wire and wire / 1e3, '.1f')} | "
            f"{_f(row.get('steps_to_target'), '.0f', 'not reached' if name != COMPUTE else '–')} | "
            f"{_f(row.get('time_to_target_s'), '.1f')} | {_f(row.get('speedup_vs_fp32_adamw'), '.2f')}"
            f"{'x' if row.get('speedup_vs_fp32_adamw') else ''} | {_f(row.get('final_val_loss'), '.4f')} |")
    return "\n".join(lines)


def seeds_table(layout_key: str, summary: dict, link: str) -> str:
    lines = [f"### Final val loss over seeds: {layout_key} (on `{link}`)", "",
             "| method | seeds | final val loss (mean ± std) | − fp32+AdamW (mean ± std of per-seed differences) | "
             "steps to target per seed |", "| --- | --- | ---: | ---: | --- |"]
    for name, s in summary.items():
        hits = ", ".join(_f(h, ".0f", "not reached") for h in s["steps_to_target"])
        lines.append(f"| {name} | {', '.join(map(str, s['seeds']))} | {s['final_mean']:.4f} ± {s['final_std']:.4f} | "
                     f"{_f(s['gap_mean'], '+.4f')} ± {s['gap_std']:.4f} | {hits} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in runs if r["seed"] == min(x["seed"] for x in runs if x["layout"] == r["layout"])]
    layouts = sorted({r["layout"] for r in panels})
    links = list(dict.fromkeys(r["link"] for r in panels))
    fig, axes = plt.subplots(len(layouts), len(links), figsize=(5 * len(links), 3.8 * len(layouts)), squeeze=False)
    for run in panels:
        ax = axes[layouts.index(run["layout"])][links.index(run["link"])]
        a = run["analysis"]
        for i, (name, row) in enumerate(a["rows"].items()):
            if "curve" not in row:
                continue
            ax.plot([c[1] for c in row["curve"]], [c[2] for c in row["curve"]], "-o", ms=2.5, color=f"C{i}",
                    label=f"{name} (lr {row['lr']:g})")
        if a["target"] is not None:
            ax.axhline(a["target"], color="grey", ls="--", lw=0.8, label="target: fp32+AdamW at 75%")
        ax.set_title(f"{run['link']}, {run['report']['num_nodes']} nodes x {run['report']['local_world_size']}")
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("val loss (nats/char)")
        finals = [row["final_val_loss"] for row in a["rows"].values() if "final_val_loss" in row]
        if finals:
            ax.set_ylim(min(finals) - 0.1, max(finals) + 1.2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(runs, failures, machine, command, stem: Path, args, lrs) -> None:
    date = common.today()
    lines = [f"# Time to AdamW's loss, GPT on text: {machine['cpu']}, {date}", "",
             f"Command: `{command}`  ",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB, Linux {machine['kernel']}, "
             f"Python {machine['python']}, torch {machine['torch']} (CPU, gloo, 1 torch thread per process); 1-min load "
             f"average at start {machine['load_avg_1min_at_start']}.  ",
             f"Workload: `{args.base}` ({runs[0]['report']['results'][0]['num_params'] / 1e6:.2f}M parameters) "
             f"{args.extra}, {args.steps} steps, {args.global_batch} windows of "
             f"{runs[0]['report']['block_size']} characters per step (split over the ranks), val loss on "
             f"{runs[0]['report']['eval_windows']} fixed windows every {args.eval_every} steps. Methods round-robin "
             "in one process group, one step of each per round. lr per method: "
             + ", ".join(f"{k} {'the app default' if v is None else format(v, 'g')}" for k, v in lrs.items()) + f"; recipes: {json.dumps(RECIPE)}, warm-up "
             f"{args.warmup} steps, cosine to 0.", ""] if runs else [f"# Time to AdamW's loss: {date}", ""]
    for run in runs:
        lines += [link_table(run), ""]
    by_layout = {}
    for run in runs:
        if run["link"] == run["seeds_link"]:
            by_layout.setdefault(run["layout"], []).append(run)
    summaries = {}
    for layout, layout_runs in sorted(by_layout.items()):
        key = f"2 nodes x {layout}" if layout_runs[0]["link"] != "loopback" else f"1 node x {2 * layout}"
        summaries[key] = seed_summary(sorted(layout_runs, key=lambda r: r["seed"]))
        lines += [seeds_table(key, summaries[key], layout_runs[0]["link"]), ""]
    same = [(r["link"], r["layout"], r["seed"], differing_methods(r, runs)) for r in runs
            if r["link"] != r["seeds_link"]]
    same = [s for s in same if s[3] is not None]
    if same:
        lines += [f"Losses against the `{runs[0]['seeds_link']}` run of the same layout and seed, every evaluation of "
                  "every method (`loopback` puts both nodes' processes on one node: HSDP shards the model over them "
                  "there, not on 2 nodes x 1, so its sums and draws differ by design): "
                  + "; ".join(f"{link} x{layout} seed {seed}: "
                              + ("identical" if not diff else "identical except " + ", ".join(diff))
                              for link, layout, seed, diff in same) + ".", ""]
    for f in failures:
        lines += [f"### {f['link']}, {f['layout']} per node, seed {f['seed']}: FAILED", "", f"`{f['error'][-300:]}`", ""]
    if runs:
        lines += [f"![val loss against training wall time]({stem.name}.png)", ""]
    payload = {"date": date, "machine": machine, "command": command, "args": vars(args), "recipe": RECIPE,
               "lrs": lrs, "runs": runs, "seed_summaries": summaries, "failures": failures}
    common.write_results(stem, "\n".join(lines), payload)
    if runs:
        plot(runs, Path(f"{stem}.png"))


def differing_methods(run: dict, runs: list[dict]) -> list[str] | None:
    """The methods whose val losses differ from the seeds link's run of the same layout and seed (None: no such run)."""
    ref = next((r for r in runs if r["link"] == r["seeds_link"] and r["layout"] == run["layout"]
                and r["seed"] == run["seed"]), None)
    if ref is None:
        return None
    a = {r["method"]: r["evals"] for r in run["report"]["results"]}
    b = {r["method"]: r["evals"] for r in ref["report"]["results"]}
    return [m for m in a if m in b and m != COMPUTE and a[m] != b[m]]


# -- the lr sweep --------------------------------------------------------------------------------------------------


def sweep_lrs(args, methods: dict) -> None:
    grid = dict(DEFAULT_LR_GRID)
    for item in args.lr_grid:
        opt, _, values = item.partition("=")
        grid[opt] = [float(v) for v in values.split(",")]
    specs = []
    for name, spec in methods.items():
        for lr in grid[optimizer_of(spec)]:
            specs.append((f"{name}@{lr:g}", method_overrides(name, spec, lr, warmup=args.warmup)))
    machine = common.machine_description()
    command = common.command_line("time_to_accuracy.py", args.argv)
    stem = Path(args.out) if args.out else common.results_path("time_to_accuracy_lr_sweep", "",
                                                               hardware=machine["cpu"], tag=args.tag)
    nodes = slow_link.TwoNodes(f"{args.netns_prefix}{os.getpid() % 100000}") if os.geteuid() == 0 else None
    nproc = 2 * args.layouts[0]  # loopback: the processes of both "nodes" on one
    try:
        started, load = time.monotonic(), common.load_average()[0]
        report = slow_link.launch_loopback(worker_args(args, specs, seed=args.seeds[0], nproc_per_node=nproc,
                                                       num_nodes=1),
                                           nodes.ns[0] if nodes else None, nproc=nproc, timeout_s=RUN_TIMEOUT_S,
                                           worker=WORKER)
    finally:
        if nodes is not None:
            nodes.close()
    finals = {r["method"]: r["evals"][-1]["val_loss"] for r in report["results"]}
    best = {}
    for name in methods:
        mine = {k: v for k, v in finals.items() if k.split("@")[0] == name}
        best[name] = float(min(mine, key=mine.get).split("@")[1])
    lines = [f"# lr sweep for the time-to-accuracy benchmark: {machine['cpu']}, {common.today()}", "",
             f"Command: `{command}`  ",
             f"Loopback, 1 node x {nproc} processes, seed {args.seeds[0]}, {args.steps} steps, `{args.base}` "
             f"{args.extra}, global batch {args.global_batch} windows; recipes {json.dumps(RECIPE)}, warm-up "
             f"{args.warmup} steps, cosine to 0. Every variant round-robin in one process group (load average "
             f"{load:.1f} at start; {time.monotonic() - started:.0f} s). Final val loss (nats/char) per lr; the "
             "best per method (bold) is what `time_to_accuracy.py` uses unless `--lr` says otherwise.", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in sorted({float(k.split('@')[1]) for k in finals}))
             + " |", "|---|" + "---:|" * len({k.split('@')[1] for k in finals})]
    all_lrs = sorted({float(k.split("@")[1]) for k in finals})
    for name in methods:
        cells = []
        for lr in all_lrs:
            value = finals.get(f"{name}@{lr:g}")
            cells.append("" if value is None else (f"**{value:.4f}**" if lr == best[name] else f"{value:.4f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    edge = [n for n in methods if best[n] in (min(grid[optimizer_of(methods[n])]), max(grid[optimizer_of(methods[n])]))]
    if edge:
        lines += ["", f"At the edge of its grid (widen it with `--lr-grid`): {', '.join(edge)}."]
    common.write_results(stem, "\n".join(lines) + "\n", {"machine": machine, "command": command, "args": vars(args),
                                                          "recipe": RECIPE, "best_lr": best, "final_val_loss": finals,
                                                          "report": report})
    print("\n".join(lines), flush=True)
    print(f"wrote {stem}.md and .json")


def swept_lrs() -> dict:
    """The best lr per method of the newest committed lr sweep without a tag
    (``results/time_to_accuracy_lr_sweep_<cpu>_<date>.json``; tagged ones are diagnostics)."""
    found = sorted(p for p in common.RESULTS_DIR.glob("time_to_accuracy_lr_sweep_*.json")
                   if re.search(r"_\d{4}-\d{2}-\d{2}\.json$", p.name))
    return json.loads(found[-1].read_text())["best_lr"] if found else {}


# -- launching -----------------------------------------------------------------------------------------------------


def worker_args(args, specs: list[tuple[str, str]], *, seed: int, nproc_per_node: int, num_nodes: int) -> list[str]:
    out = ["--steps", str(args.steps), "--seed", str(seed), "--eval-every", str(args.eval_every),
           "--eval-steps", str(round(TARGET_FRACTION * args.steps)),
           "--base", base_overrides(args, nproc_per_node, num_nodes), "--timeout-s", str(args.timeout_s)]
    for name, overrides in specs:
        out += ["--method", f"{name}={overrides}"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", nargs="+", default=["100mbit", "1gbit", "loopback"])
    parser.add_argument("--layouts", nargs="+", type=int, default=[1, 2], help="processes per node")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--method", action="append", default=[], metavar='NAME="OVERRIDES"',
                        help="one more method: a name and the app overrides that make it (compression, optim, ...)")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="lr of a method")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seeds-link", default=None, help="the link the seeds after the first run on "
                        "(default: loopback if measured, else the first link); the other links run the first seed")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--global-batch", type=int, default=32, help="windows per step, all ranks together")
    parser.add_argument("--warmup", type=int, default=20, help="lr warm-up steps of every method")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--base", default=BASE, help="the workload's app overrides")
    parser.add_argument("--extra", default="", help="more app overrides for every method (model size, data)")
    parser.add_argument("--no-compute", action="store_true", help="skip the timing-only compute method")
    parser.add_argument("--lr-sweep", action="store_true", help="sweep each method's lr on loopback instead")
    parser.add_argument("--lr-grid", nargs="*", default=[], metavar="OPTIM=LR,LR,...",
                        help=f"the sweep's lrs per optimizer (default {DEFAULT_LR_GRID})")
    parser.add_argument("--netns-prefix", default="tta", help="prefix of the namespaces and veths this run creates")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="a collective waiting this long fails the run")
    parser.add_argument("--quick", action="store_true", help="smoke: a tiny GPT, 20 steps, 100mbit and loopback")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/time_to_accuracy_...)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:  # what the command line leaves at its default
        quick = {"links": ["100mbit", "loopback"], "seeds": [0, 1], "steps": 20, "eval_every": 5, "warmup": 2}
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        args.extra = (args.extra + " model.n_layer=1 model.n_head=2 model.n_embd=32 data.eval_windows=8").strip()
        args.tag = args.tag or "quick"
    methods = {}
    for name in [m for m in args.methods.split(",") if m]:
        if name not in METHODS:
            parser.error(f"--methods: {name!r} is not one of {', '.join(METHODS)} (add one with --method)")
        methods[name] = METHODS[name]
    for item in args.method:
        name, _, spec = item.partition("=")
        if not name or not spec:
            parser.error(f'--method {item!r}: expected NAME="app overrides"')
        methods[name] = spec
    if REFERENCE not in methods:
        parser.error(f"--methods: {REFERENCE} is the reference every speed-up is against")
    if args.steps * TARGET_FRACTION != round(args.steps * TARGET_FRACTION):
        parser.error(f"--steps {args.steps}: 75% of it must be a whole step")
    for link in args.links:
        if link != "loopback":
            slow_link.rate_bits(link)
    if args.lr_sweep:
        return sweep_lrs(args, methods)

    lrs = swept_lrs()
    for item in args.lr:
        name, _, value = item.partition("=")
        lrs[name] = float(value)
    # A method the sweep left out takes the swept lr of its optimizer's sweep representative (fp16, PowerSGD
    # and HSDP fp32 compress or shard AdamW's exchange, hsdp_birder is Birder's: the same update rule).
    representative = {"adamw": REFERENCE, "birder": "birder"}
    lrs = {name: lrs.get(name, lrs.get(representative.get(optimizer_of(spec), name)))
           for name, spec in methods.items()}
    specs = [(name, method_overrides(name, spec, lrs[name], warmup=args.warmup)) for name, spec in methods.items()]
    if not args.no_compute:
        specs.append((COMPUTE, method_overrides(COMPUTE, TIMING_ONLY[COMPUTE], lrs[REFERENCE], warmup=args.warmup)))
    shaped = [link for link in args.links if link != "loopback"]
    reason = slow_link.netns_unavailable_reason()
    if shaped and reason:
        sys.exit(f"time_to_accuracy.py: {reason}")
    seeds_link = args.seeds_link or ("loopback" if "loopback" in args.links else args.links[0])
    from dist_supernet.data import load_text

    load_text()  # build the corpus cache once, before the workers (they would all build it at once)
    machine = common.machine_description()
    command = common.command_line("time_to_accuracy.py", args.argv)
    stem = Path(args.out) if args.out else common.results_path("time_to_accuracy", "", hardware=machine["cpu"],
                                                               tag=args.tag)
    nodes = slow_link.TwoNodes(f"{args.netns_prefix}{os.getpid() % 100000}") if reason is None else None
    runs, failures = [], []
    try:
        for link in args.links:
            goodput = None
            if link != "loopback":
                nodes.shape(link)
                goodput = slow_link.probe_goodput(nodes, link)
                print(f"[{link}] TCP goodput {goodput / 1e6:.0f} Mbit/s", flush=True)
            for layout in args.layouts:
                for seed in (args.seeds if link == seeds_link else args.seeds[:1]):
                    started, load_before = time.monotonic(), common.load_average()[0]
                    try:
                        if link == "loopback":
                            wargs = worker_args(args, specs, seed=seed, nproc_per_node=2 * layout, num_nodes=1)
                            report = slow_link.launch_loopback(wargs, nodes.ns[0] if nodes else None, nproc=2 * layout,
                                                               timeout_s=RUN_TIMEOUT_S, worker=WORKER)
                        else:
                            wargs = worker_args(args, specs, seed=seed, nproc_per_node=layout, num_nodes=2)
                            report = slow_link.launch(wargs, nodes=nodes, nproc_per_node=layout,
                                                      timeout_s=RUN_TIMEOUT_S, worker=WORKER)
                    except RuntimeError as error:  # keep going: the other links still say something
                        print(f"[{link} x{layout} seed {seed}] FAILED:\n{error}", flush=True)
                        failures.append({"link": link, "layout": layout, "seed": seed, "error": str(error)[-4000:]})
                        write_results(runs, failures, machine, command, stem, args, lrs)
                        continue
                    run = {"link": link, "layout": layout, "seed": seed, "seeds_link": seeds_link,
                           "goodput_bit_s": goodput, "burst": slow_link.tbf_burst(link) if link != "loopback" else None,
                           "load_before": load_before, "load_after": common.load_average()[0],
                           "wall_s": time.monotonic() - started, "report": report, "analysis": analyse(report)}
                    runs.append(run)
                    print(link_table(run) + "\n", flush=True)
                    write_results(runs, failures, machine, command, stem, args, lrs)  # what is done so far
    finally:
        if nodes is not None:
            nodes.close()
    write_results(runs, failures, machine, command, stem, args, lrs)
    print(f"wrote {stem}.md, .json and .png")


if __name__ == "__main__":
    main()
