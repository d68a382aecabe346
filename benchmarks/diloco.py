"""Which method reaches DDP AdamW's validation loss first when worker groups are joined by a slow link,
and what does each send?

Every method trains the same model on the same data from the same seed for the same number of
steps with the training application (``python -m dist_supernet.train``), G worker groups of L
ranks each (one group = one node):

- ``ddp_adamw``: DDP's fp32 all-reduce over every rank every step, AdamW (the reference);
- ``birder``: per-step Birder, 1 bit per element per step (hierarchical collective across nodes);
- ``diloco_<q>``: AdamW inside each node (DDP over the node's ranks), every H steps the
  pseudo-gradient exchanged between nodes with quantizer q (``fp32``, ``int4``, ``onebit``; outer
  Nesterov) or ``birder`` (Birder as the outer optimizer), all fragments at once, blocking;
- ``diloco_<q>_streamed``: the same with F fragments at offsets spread over H, each exchange
  overlapped with the next tau inner steps (Streaming DiLoCo).

Links: ``none`` runs one ``torchrun --standalone`` over loopback (G pretend nodes,
``compression.num_nodes=G``): losses and bytes, not link time. A tc rate (``10mbit``,
``100mbit``) puts each node in its own network namespace (``common.Nodes``: two nodes over a veth
pair, more over a bridge, every node's up- and downlink shaped with tbf), one torchrun per node
joined by c10d rendezvous: what a slow link costs in wall time.

Reported per (link, G): bytes per inner step (sent between nodes, per node), final validation
loss (mean and std over seeds), wall time to reach DDP AdamW's final validation loss of the same
seed, and a PNG of validation loss against wall-clock. ``--sweep`` trains the DiLoCo methods over
H and the outer learning rate instead.

Usage (root for shaped links; every figure in one run; see the README's section)::

    python benchmarks/diloco.py --links none --groups 2 4 --seeds 0 1 2          # losses and bytes
    python benchmarks/diloco.py --links 10mbit 100mbit --groups 2 4 --seeds 0 1 2  # wall time (quiet machine)
    python benchmarks/diloco.py --links none --groups 2 --sweep                     # H and outer lr
    python benchmarks/diloco.py --quick                                             # smoke, ~2 min

Writes ``benchmarks/results/diloco_<machine>_<date>[_<tag>].md`` and ``.json``, and
``..._<link>_<G>groups.png`` per (link, G).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

RDZV_PORT = 29561
PROBE_PORT = 29571
SUBNET = "10.78.0"  # only inside the namespaces this script creates (slow_link.py uses 10.77.0)
RUN_TIMEOUT_S = 3600
QUANTIZERS = ("fp32", "int4", "onebit", "birder")
METHODS = ("ddp_adamw", "birder", *(f"diloco_{q}" for q in QUANTIZERS), *(f"diloco_{q}_streamed" for q in QUANTIZERS))
# Sizes for a shared 2-core CPU (60 runs in about 2 hours); --set overrides them (the last value wins).
# gpt: 2 layers x 2 heads x 64 wide, 64-character context (0.11M parameters, ~70 ms a step on 2 ranks);
# mlp: 0.17M parameters, so the one-bit payload's per-block scale and padding stay under 4% of it.
DEFAULT_SET = {"gpt": ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"],
               "mlp": ["model.hidden=[512,256]"]}


def method_overrides(method: str, args) -> list[str]:
    """The app's overrides for one method (on top of the common ones)."""
    if method == "ddp_adamw":
        return ["compression=none", "optim=adamw"]
    if method == "birder":
        return ["compression=birder", "optim=birder", f"optim.lr={args.birder_lr}"]
    parts = method.split("_")
    quantizer, streamed = parts[1], parts[-1] == "streamed"
    out = ["compression=none", "optim=adamw", "sync=diloco", f"sync.every={args.every}", f"sync.quantizer={quantizer}"]
    if quantizer == "birder":
        out += ["sync.outer=birder", f"sync.outer_lr={args.birder_outer_lr}"]
    else:
        out += [f"sync.outer_lr={args.outer_lr}"]
    if streamed:
        out += ["sync.streaming=true", f"sync.fragments={args.fragments}"]
        if args.delay is not None:
            out += [f"sync.delay={args.delay}"]
    return out


def method_steps(method: str, args) -> int:
    """Inner steps of one method: ``--steps`` for DDP AdamW (the reference), ``--long-steps`` for the others."""
    return args.steps if method == "ddp_adamw" or args.long_steps is None else args.long_steps


def common_overrides(args, groups: int, seed: int, steps: int) -> list[str]:
    return [f"model={args.model}", f"data={args.data}", f"trainer.max_steps={steps}",
            f"trainer.batch_size={args.batch_size}", f"trainer.eval_every={args.eval_every}",
            f"trainer.log_every={args.eval_every}", "trainer.checkpoint_every=0",
            f"trainer.seed={seed}", f"compression.num_nodes={groups}", f"optim.lr={args.lr}",
            *DEFAULT_SET.get(args.model, []), *args.set]


def launch(overrides: list[str], run_dir: Path, *, nodes, groups: int, ranks: int) -> tuple[dict, list[dict]]:
    """One training run (``nodes``: namespaces, or None for loopback); its summary and metrics rows."""
    app = ["-m", "dist_supernet.train", *overrides, f"hydra.run.dir={run_dir}"]
    procs, logs = [], []
    if nodes is None:
        commands = [([], "lo", common.torchrun_command(groups * ranks, *app))]
    else:
        commands, rdzv_id = [], f"diloco{os.getpid()}x{time.monotonic_ns()}"  # one id: every node's agent joins it
        for i, (ns, iface, addr) in enumerate(zip(nodes.ns, nodes.iface, nodes.addr)):
            commands.append((["ip", "netns", "exec", ns], iface, common.torchrun_command(ranks, standalone=False) + [
                f"--nnodes={groups}", "--rdzv_backend=c10d", f"--rdzv_endpoint={nodes.addr[0]}:{RDZV_PORT}",
                f"--rdzv_id={rdzv_id}", f"--rdzv_conf=is_host={int(i == 0)}",
                f"--local_addr={addr}", *app]))
    for prefix, iface, cmd in commands:
        log = tempfile.TemporaryFile("w+")
        env = common.repo_env(GLOO_SOCKET_IFNAME=iface, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(prefix + cmd, cwd=common.REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
        logs.append(log)
    common.wait_all(procs, logs, RUN_TIMEOUT_S, what="a training run")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def measure(summary: dict, rows: list[dict], groups: int) -> dict:
    steps = summary["steps"]
    return {
        "steps": steps,
        "final_val_loss": summary["eval_loss"],
        "final_val_accuracy": summary.get("eval_accuracy"),
        # steps and their exchanges, not evaluation (the app's train_time_s; wall_time_s before it existed)
        "wall_time_s": summary.get("train_time_s", summary["wall_time_s"]),
        # what crosses the slow link: inter-node bytes, per node, per inner step
        "inter_bytes_per_step_per_node": summary["bytes_inter_total"] / groups / steps,
        "bytes_per_step_per_rank": summary["bytes_sent_total"] / summary["world_size"] / steps,
        "params_in_sync": summary["params_in_sync"],
        "num_params": summary["num_params"],
        "curve": [(r.get("train_time_s", r["wall_time_s"]), r["val_loss"], r["step"]) for r in rows
                  if r.get("val_loss") is not None],
        "sync": summary.get("sync"),
    }


def time_to(curve, target: float):
    """Wall seconds of the first evaluation at or below ``target`` (None: never)."""
    return next((t for t, loss, _ in curve if loss <= target), None)


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def summarize(results: list[dict], link: str, groups: int, methods) -> list[dict]:
    """One row per method: means over seeds; time to the same seed's DDP AdamW final val loss."""
    mine = [r for r in results if r["link"] == link and r["groups"] == groups]
    targets = {r["seed"]: r["final_val_loss"] for r in mine if r["method"] == "ddp_adamw"}
    ref = {m: [r for r in mine if r["method"] == m] for m in methods}
    fp32_bytes = _stats([r["inter_bytes_per_step_per_node"] for r in ref.get("diloco_fp32", [])])[0]
    ddp_bytes = _stats([r["inter_bytes_per_step_per_node"] for r in ref.get("ddp_adamw", [])])[0]
    rows = []
    for method in methods:
        runs = ref[method]
        if not runs:
            continue
        loss, loss_sd, n = _stats([r["final_val_loss"] for r in runs])
        inter = _stats([r["inter_bytes_per_step_per_node"] for r in runs])[0]
        reach = [time_to(r["curve"], targets[r["seed"]]) if r["seed"] in targets else None for r in runs]
        reached = [t for t in reach if t is not None]
        rows.append({
            "method": method, "seeds": n, "steps": max(r["steps"] for r in runs),
            "final_val_loss": loss, "final_val_loss_sd": loss_sd,
            "inter_bytes_per_step_per_node": inter,
            "fewer_bytes_than_ddp": ddp_bytes / inter if ddp_bytes and inter else None,
            "fewer_bytes_than_diloco_fp32": fp32_bytes / inter if fp32_bytes and inter else None,
            "time_to_ddp_loss_s": statistics.mean(reached) if reached else None,
            "reached": f"{len(reached)}/{len(runs)}",
            "wall_time_s": _stats([r["wall_time_s"] for r in runs])[0],
            "params_in_sync": all(r["params_in_sync"] for r in runs),
        })
    return rows


def _num(value, fmt="{:.3f}"):
    return "n/a" if value is None else fmt.format(value)


def markdown_table(rows: list[dict], link: str) -> list[str]:
    wall = "wall s to DDP AdamW's loss" + (" (loopback: CPU time, not link time)" if link == "none" else "")
    lines = [f"| method | inner steps | final val loss (mean ± sd, seeds) | inter-node bytes / step / node | "
             f"x fewer than DDP | x fewer than DiLoCo fp32 | {wall} [reached] | wall s (train) | "
             "replicas equal at end |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['steps']} | "
            f"{_num(r['final_val_loss'], '{:.4f}')} ± {_num(r['final_val_loss_sd'], '{:.4f}')} "
            f"({r['seeds']}) | {_num(r['inter_bytes_per_step_per_node'], '{:.1f}')} | "
            f"{_num(r['fewer_bytes_than_ddp'], '{:.0f}x')} | {_num(r['fewer_bytes_than_diloco_fp32'], '{:.1f}x')} | "
            f"{_num(r['time_to_ddp_loss_s'], '{:.1f}')} [{r['reached']}] | {_num(r['wall_time_s'], '{:.1f}')} | "
            f"{'yes' if r['params_in_sync'] else 'NO'} |")
    return lines


def plot(results: list[dict], link: str, groups: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    seed = min(r["seed"] for r in results if r["link"] == link and r["groups"] == groups)
    for r in results:
        if r["link"] == link and r["groups"] == groups and r["seed"] == seed and r["curve"]:
            times, losses, _ = zip(*r["curve"])
            style = "--" if r["method"].endswith("_streamed") else "-"
            ax.plot(times, losses, style, marker=".", label=r["method"])
    target = next((r["final_val_loss"] for r in results if r["link"] == link and r["groups"] == groups
                   and r["seed"] == seed and r["method"] == "ddp_adamw"), None)
    if target is not None:
        ax.axhline(target, color="gray", linewidth=0.8, label="DDP AdamW's final val loss")
    ax.set_xlabel("wall-clock s (training)" + (" over loopback" if link == "none" else f" at {link}"))
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", nargs="+", default=["none"], help="'none' (loopback) and/or tc rates (10mbit ...)")
    parser.add_argument("--groups", nargs="+", type=int, default=[2, 4], help="worker groups (nodes)")
    parser.add_argument("--ranks-per-group", type=int, default=1, help="ranks per group (DDP inside it)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--model", default="gpt")
    parser.add_argument("--data", default="text")
    parser.add_argument("--set", action="append", default=[], help="an extra app override (repeatable)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--long-steps", type=int, default=None,
                        help="inner steps of every method but DDP AdamW (default --steps): a step that sends less "
                             "costs less on a slow link, so a longer budget shows whether it reaches DDP AdamW's "
                             "loss sooner")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3, help="inner AdamW lr (and DDP AdamW's)")
    parser.add_argument("--birder-lr", type=float, default=1e-3, help="per-step Birder's lr")
    parser.add_argument("--every", type=int, default=100, help="H")
    parser.add_argument("--fragments", type=int, default=4, help="F of the streamed methods")
    parser.add_argument("--delay", type=int, default=None, help="tau of the streamed methods (default H // 2F)")
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--birder-outer-lr", type=float, default=0.01)
    parser.add_argument("--sweep", action="store_true", help="sweep H and the outer lr for the DiLoCo methods")
    parser.add_argument("--sweep-every", nargs="+", type=int, default=[25, 50, 100, 200])
    parser.add_argument("--sweep-outer-lr", nargs="+", type=float, default=[0.3, 0.5, 0.7, 1.0])
    parser.add_argument("--sweep-birder-outer-lr", nargs="+", type=float, default=[0.003, 0.01, 0.03])
    parser.add_argument("--quick", action="store_true", help="smoke: 60 steps, H 20, seed 0, 2 groups")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/diloco_<machine>_<date>)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.eval_every, args.seeds = 60, 20, 10, [0]
        args.groups = args.groups if args.groups != [2, 4] else [2]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"diloco.py: --methods {','.join(unknown)}: expected some of {', '.join(METHODS)}")
    shaped = [link for link in args.links if link != "none"]
    for link in shaped:
        common.rate_bits(link)
    reason = common.netns_unavailable_reason() if shaped else None
    if reason:
        sys.exit(f"diloco.py: {reason}")

    machine = common.machine_description()
    command = common.command_line("diloco.py", argv)
    kind = "diloco_sweep" if args.sweep else "diloco"
    stem = Path(args.out) if args.out else common.results_path(kind, "", hardware=machine["cpu"], tag=args.tag)
    jobs = []  # (link, groups, seed, method, label, overrides)
    for link in args.links:
        for groups in args.groups:
            for seed in args.seeds:
                if not args.sweep:
                    for method in methods:
                        jobs.append((link, groups, seed, method, method, method_overrides(method, args)))
                    continue
                for method in [m for m in methods if m.startswith("diloco_")]:
                    is_birder = "birder" in method
                    for every in args.sweep_every:
                        jobs.append((link, groups, seed, method, f"{method} H={every}",
                                     method_overrides(method, argparse.Namespace(**{**vars(args), "every": every}))))
                    for lr in (args.sweep_birder_outer_lr if is_birder else args.sweep_outer_lr):
                        key = "birder_outer_lr" if is_birder else "outer_lr"
                        jobs.append((link, groups, seed, method, f"{method} lr={lr}",
                                     method_overrides(method, argparse.Namespace(**{**vars(args), key: lr}))))
    results, failures = [], []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="diloco_bench_") as tmp:
        nodes_by_groups = {}
        try:
            for link in args.links:
                for groups in args.groups:
                    nodes = None
                    if link != "none":
                        if groups not in nodes_by_groups:
                            nodes_by_groups[groups] = common.Nodes(f"diloco{os.getpid() % 10000}g{groups}", groups,
                                                                   subnet=SUBNET)
                        nodes = nodes_by_groups[groups]
                        nodes.shape(link)
                    for (j_link, j_groups, seed, method, label, overrides) in jobs:
                        if (j_link, j_groups) != (link, groups):
                            continue
                        run_dir = Path(tmp) / f"{len(results) + len(failures):04d}"
                        load = common.load_average()[0]
                        t0 = time.monotonic()
                        try:
                            summary, rows = launch([*common_overrides(args, groups, seed, method_steps(method, args)),
                                                    *overrides], run_dir,
                                                   nodes=nodes, groups=groups, ranks=args.ranks_per_group)
                        except (RuntimeError, FileNotFoundError, subprocess.SubprocessError) as error:
                            print(f"[{link} G={groups} seed {seed} {label}] FAILED: {str(error)[-1500:]}", flush=True)
                            failures.append({"link": link, "groups": groups, "seed": seed, "label": label,
                                             "error": str(error)[-4000:]})
                            continue
                        result = {"link": link, "groups": groups, "seed": seed, "method": method, "label": label,
                                  "overrides": overrides, "load_before": load, "load_after": common.load_average()[0],
                                  "launch_s": time.monotonic() - t0, **measure(summary, rows, groups)}
                        results.append(result)
                        print(f"[{link} G={groups} seed {seed}] {label}: val loss {result['final_val_loss']:.4f}, "
                              f"{result['inter_bytes_per_step_per_node']:.1f} B/step/node between nodes, "
                              f"{result['wall_time_s']:.1f} s (load {load:.1f})", flush=True)
                        write(results, failures, args, machine, command, stem, methods)
        finally:
            for nodes in nodes_by_groups.values():
                nodes.close()
    write(results, failures, args, machine, command, stem, methods)
    print(f"wrote {stem}.md and .json ({time.monotonic() - started:.0f} s)")


def write(results, failures, args, machine, command, stem: Path, methods) -> None:
    date = common.today()
    lines = [
        f"# DiLoCo with compressed exchanges{' (sweep of H and outer lr)' if args.sweep else ''}: "
        f"{machine['cpu']}, {date}", "",
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB, torch {machine['torch']} "
        f"(CPU, gloo); 1-min load average at start {machine['load_avg_1min_at_start']} (each run's load is in the "
        ".json). Shared machine: wall times are indicative only; losses and bytes do not depend on the load.  ",
        f"Model `{args.model}` on `{args.data}` ({' '.join(DEFAULT_SET.get(args.model, []) + args.set) or 'defaults'}), "
        f"{args.steps} steps" + (f" for DDP AdamW and {args.long_steps} for every other method (cosine over each "
                                 "run's own steps)" if args.long_steps else "") +
        f", batch {args.batch_size} per rank, {args.ranks_per_group} rank(s) per group, "
        f"AdamW lr {args.lr} (cosine), evaluation every {args.eval_every} steps; DiLoCo H={args.every}, outer "
        f"Nesterov lr {args.outer_lr} momentum 0.9, Birder-outer lr {args.birder_outer_lr}; streamed: F="
        f"{args.fragments} fragments, tau={'H // 2F' if args.delay is None else args.delay}, merge mix 0.5; "
        f"per-step Birder lr {args.birder_lr}. Seeds {', '.join(map(str, args.seeds))}.", "",
        "Columns: *final val loss* after the last step (DiLoCo ends with every fragment synchronised, so "
        "every replica is the same model); *inter-node bytes / step / node*: the bytes a node sends to other "
        "nodes per inner step (the project's CommStats: payload bytes, ring model; DDP inside a node is "
        "intra-node and not in it); *wall s to DDP AdamW's loss*: the first evaluation at or below DDP AdamW's "
        "final val loss of the same seed, mean over the seeds that reached it.", "",
    ]
    if not args.sweep:
        for link in dict.fromkeys(r["link"] for r in results):
            for groups in sorted({r["groups"] for r in results if r["link"] == link}):
                rows = summarize(results, link, groups, methods)
                num_params = next(r["num_params"] for r in results if r["link"] == link and r["groups"] == groups)
                png = Path(f"{stem}_{link}_{groups}groups.png")
                plot(results, link, groups, png,
                     f"{args.model}/{args.data}, {groups} groups x {args.ranks_per_group}, link {link}, seed "
                     f"{min(args.seeds)}")
                lines += [f"## link `{link}`, {groups} groups x {args.ranks_per_group} rank(s) "
                          f"({num_params} parameters)", "", *markdown_table(rows, link), "", f"![loss vs wall-clock]"
                          f"({png.name})", ""]
    else:
        lines += ["| link | groups | run | final val loss (mean over seeds) | inter-node bytes / step / node |",
                  "| --- | ---: | --- | ---: | ---: |"]
        labels = list(dict.fromkeys((r["link"], r["groups"], r["label"]) for r in results))
        for link, groups, label in labels:
            runs = [r for r in results if (r["link"], r["groups"], r["label"]) == (link, groups, label)]
            loss, sd, n = _stats([r["final_val_loss"] for r in runs])
            inter = _stats([r["inter_bytes_per_step_per_node"] for r in runs])[0]
            lines.append(f"| {link} | {groups} | {label} | {loss:.4f} ± {sd:.4f} ({n}) | {inter:.1f} |")
        lines.append("")
    for f in failures:
        lines_ = f["error"].strip().splitlines()
        last = next((line for line in lines_ if line.startswith("error:")), lines_[-1] if lines_ else "")
        lines.append(f"- FAILED: {f['link']}, {f['groups']} groups, seed {f['seed']}, {f['label']}: `{last[:300]}`")
    payload = {"date": date, "machine": machine, "command": command, "args": vars(args), "results": results,
               "failures": failures}
    common.write_results(stem, "\n".join(lines) + "\n", payload)


if __name__ == "__main__":
    main()
