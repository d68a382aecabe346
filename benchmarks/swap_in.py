"""Issue 10's evidence: examples/ddp_client.py on 2 gloo processes, Birder next to AdamW, every habit.

One question per block, baselines in the same run: Birder vs AdamW at equal steps over 3 seeds
(clipping at 1.0, the script's default), clipping off, fp16 with GradScaler (and an inf injected
into one rank's loss), bf16 autocast, and a rank-0-only checkpoint resumed on every rank. Each run
is ``torchrun --standalone --nproc_per_node=2 examples/ddp_client.py ... --out run.json``; the
table goes to ``benchmarks/results/swap_in_<date>.md`` with the CPU model and load average.

Example::
    python benchmarks/swap_in.py                 # ~25 runs, ~20 min on 2 busy cores
    python benchmarks/swap_in.py --quick         # seed 0 only, no lr sweep
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = os.path.join(ROOT, "examples", "ddp_client.py")
LR = {"adamw": 1e-3, "birder": 1e-3}  # chosen on seed 0 from the lr sweep below


def runs(seeds, lr_sweep):
    """(block, name, args) of every run, in the order they are launched."""
    out = []
    for seed in seeds:
        for opt in ("adamw", "birder"):
            out.append(("clip 1.0", f"{opt}_s{seed}", ["--optimizer", opt, "--lr", str(LR[opt]), "--seed", str(seed)]))
    for seed in seeds:
        for opt in ("adamw", "birder"):
            out.append(("clip off", f"{opt}_noclip_s{seed}",
                        ["--optimizer", opt, "--lr", str(LR[opt]), "--seed", str(seed), "--grad-clip", "0"]))
    if lr_sweep:
        for opt, lrs in (("adamw", ["3e-3"]), ("birder", ["3e-4", "2e-3", "3e-3"])):
            for lr in lrs:
                out.append(("lr sweep (seed 0)", f"{opt}_lr{lr}_s0", ["--optimizer", opt, "--lr", lr, "--seed", "0"]))
    for opt in ("adamw", "birder"):
        base = ["--optimizer", opt, "--lr", str(LR[opt]), "--seed", "0"]
        out.append(("fp16 + GradScaler", f"{opt}_fp16", base + ["--dtype", "float16"]))
        out.append(("fp16 + GradScaler, inf on rank 1 at iter 100", f"{opt}_fp16_overflow",
                    base + ["--dtype", "float16", "--overflow-at", "100", "--overflow-rank", "1"]))
        out.append(("bf16 autocast", f"{opt}_bf16", base + ["--dtype", "bfloat16"]))
        out.append(("rank-0 checkpoint at iter 149, resumed on every rank", f"{opt}_save", base + ["--save-at", "149"]))
        out.append(("rank-0 checkpoint at iter 149, resumed on every rank", f"{opt}_resume", base + ["--resume"]))
    return out


def launch(name, args, workdir):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    out = os.path.join(workdir, f"{name}.json")
    ckpt = os.path.join(workdir, f"{name.rsplit('_', 1)[0]}_ckpt.pt")
    cmd = common.torchrun_command(2, CLIENT, *args, "--out", out)
    if "--save-at" in args or "--resume" in args:
        cmd += ["--ckpt", ckpt]
    load_before = f"{common.load_average()[0]:.2f}"
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.time() - start
    result = json.load(open(out)) if proc.returncode == 0 and os.path.exists(out) else {}
    warned = "rank 0 of 2 only" in proc.stderr or "state dict holds the m, b of rank 0" in proc.stderr
    result.update(rc=proc.returncode, wall_s=wall, load_before=load_before, resume_warned=warned,
                  command="torchrun --standalone --nproc_per_node=2 examples/ddp_client.py " + " ".join(args))
    if proc.returncode != 0:
        result["error"] = proc.stderr[-2000:]
    return result


def fmt(values, digits=4):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(results, path, seeds, started):
    cpu = common.cpu_name()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or open(os.path.join(ROOT, "SNAP_COMMIT")).read().strip()
    lines = [f"# Birder swapped into a nanoGPT-style DDP script (issue 10) — {started:%Y-%m-%d}", "",
             f"`python benchmarks/swap_in.py` at {commit}: `examples/ddp_client.py` (a 101,834-parameter "
             "transformer on sklearn's 8x8 digits, each row a token), 2 gloo processes (torchrun), 300 iterations, "
             "2 micro-steps of 32 per rank via `require_backward_grad_sync`, warm-up + cosine lr set per iteration, "
             "decay/no-decay groups built before the DDP wrap, `opt.attach(ddp)`. Loss = validation "
             "cross-entropy on 359 held-out images at the end.", "",
             f"CPU: {cpu}, 2 cores shared with other jobs; load average (1 min) before each run in the last "
             "column. Wall times are noise under that load.", "",
             "| block | run | val loss | val acc | bytes/param/step | vs fp32 (4 B) | replicas equal | "
             "scales equal | skipped iters (rank 0, rank 1) | scale first→min→last | wall s | load |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: | ---: |"]
    for r in results:
        per = r.get("bytes_per_param_step")
        lines.append("| {block} | {name} | {val} | {acc} | {per} | {ratio} | {sync} | {scales} | {skipped} | {scale} | "
                     "{wall:.0f} | {load} |".format(
                         block=r["block"], name=r["name"], val=fmt([r.get("val_loss")]), acc=fmt([r.get("val_acc")], 3),
                         per="fp32 all-reduce" if per is None else f"{per:.4f}",
                         ratio="-" if per is None else f"{r['fp32_ratio']:.1f}x",
                         sync=r.get("replicas_in_sync", "rc=%s" % r["rc"]), scales=r.get("scales_equal_on_all_ranks"),
                         skipped=r.get("skipped_iters_per_rank"),
                         scale="-" if "scale_first" not in r else f"{r['scale_first']:g}→{r['scale_min']:g}→"
                                                                  f"{r['scale_last']:g}",
                         wall=r["wall_s"], load=r["load_before"]))
    lines += ["", "## Birder vs AdamW at equal steps (mean ± std over seeds " + ", ".join(map(str, seeds)) + ")", "",
              "| optimizer | clipping | val loss | val acc |", "| --- | --- | ---: | ---: |"]
    summary = {}
    for block, tag in (("clip 1.0", "1.0"), ("clip off", "off")):
        for opt in ("adamw", "birder"):
            rows = [r for r in results if r["block"] == block and r.get("optimizer") == opt]
            summary[(opt, tag)] = [r["val_loss"] for r in rows]
            lines.append(f"| {opt} (lr {LR[opt]:g}) | {tag} | {fmt([r['val_loss'] for r in rows])} | "
                         f"{fmt([r['val_acc'] for r in rows], 3)} |")
    if summary.get(("adamw", "1.0")) and summary.get(("birder", "1.0")):
        gap = statistics.mean(summary[("birder", "1.0")]) - statistics.mean(summary[("adamw", "1.0")])
        lines += ["", f"Birder − AdamW (clipping at 1.0, mean val loss): {gap:+.4f} (target: within ±0.05)."]
    if summary.get(("birder", "off")) and summary.get(("birder", "1.0")):
        same = summary[("birder", "off")] == summary[("birder", "1.0")]
        lines.append(f"Birder with clipping vs without: {'bit-identical final losses' if same else 'different'} "
                     "(clipping acts on this rank's .grad, never on the 1-bit update).")
    lines += ["", "## Commands", ""] + [f"- `{r['command']}`" for r in results]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 only, no lr sweep")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1, 2]
    started = common.utc_now()
    path = args.out or str(common.results_path("swap_in", date=f"{started:%Y-%m-%d}"))
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for block, name, run_args in runs(seeds, lr_sweep=not args.quick):
            result = launch(name, run_args, workdir)
            result.update(block=block, name=name)
            results.append(result)
            print(f"{name}: rc {result['rc']}, val loss {result.get('val_loss')}, {result['wall_s']:.0f} s",
                  flush=True)
            if result["rc"] != 0:
                print(result["error"], file=sys.stderr)
            report(results, path, seeds, started)  # rewritten after every run: an interrupted sweep keeps its rows
    with open(path.replace(".md", ".json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
