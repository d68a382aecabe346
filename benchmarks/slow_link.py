"""How much faster is Birder than DDP fp32 over a slow link, and how much slower over a fast one?

Two "nodes" on this machine: two network namespaces joined by a veth pair,
each end's egress shaped with ``tc qdisc ... tbf``; one process per node
(``benchmarks/step_worker.py`` under two torchrun invocations, c10d
rendezvous across the link). For each link rate and model, in one run: the
median step time and the bytes on the wire per step of DDP fp32, torch's fp16
hook, torch's PowerSGD (rank 4) and Birder with each 1-bit collective; the
speedup of each against DDP fp32, and the ideal speedup

    ideal = t_fp32 / (t_compute + (t_fp32 - t_compute) / 32)

(t_compute: the same steps under DDP ``no_sync``; a 32x smaller message
with the same compute). The bytes come twice: the project's accounting
(``CommStats``) and the veth's own counters (``/proc/net/dev`` in the
namespace: what really crossed, with TCP/IP headers and ACKs).

The ``loopback`` link is the opposite question: two processes on one node
(``torchrun --standalone``, gloo on ``lo``), nothing shaped; how much slower
than DDP fp32 is Birder when the network is fast. Run as root it uses a
private namespace so that ``lo``'s counters hold only this benchmark's bytes.

Before each shaped link, a raw TCP stream measures the goodput the shaped
link really gives (tbf counts headers; the veth costs CPU on 2 cores).

Usage (root; see benchmarks/README.md)::

    python benchmarks/slow_link.py                      # 100mbit, 1gbit, loopback; mlp and cnn
    python benchmarks/slow_link.py --links loopback --models mlp
    python benchmarks/slow_link.py --quick              # smoke: tiny model, 1 timed step
    python benchmarks/slow_link.py --links loopback --models mlp --profile   # where Birder's time goes
    python benchmarks/slow_link.py --plugins my_package.my_collective --help  # its methods listed too

The methods are step_worker's (the registered baselines and 1-bit collectives;
``--plugins`` modules are imported first and passed on to every worker).

Writes ``benchmarks/results/slow_link_<machine>_<date>.md`` and ``.json``
(``slow_link_profile_...`` with ``--profile``).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
WORKER = HERE / "step_worker.py"
sys.path.insert(0, str(HERE))
import step_worker  # noqa: E402  (its method list: the registries)

ADDR_A, ADDR_B = common.TWO_NODE_ADDRS  # only inside the namespaces this script creates
RDZV_PORT = 29531
PROBE_PORT = 29541
LINKS = ["100mbit", "1gbit", "loopback"]
# Timed steps per link: fp32 of the 10.5M MLP takes ~4.2 s a step at 100 Mbit/s, of the
# 15.7M CNN ~6.3 s; a whole default run takes ~10 minutes on 2 shared cores.
DEFAULT_STEPS = {"100mbit": 3, "1gbit": 5, "loopback": 8}
RUN_TIMEOUT_S = 900


# The shaped links (namespaces, veth, tbf) are benchmarks/common.py's, shared with benchmarks/diloco.py.
rate_bits, tbf_burst, netns_unavailable_reason, TwoNodes = (
    common.rate_bits, common.tbf_burst, common.netns_unavailable_reason, common.TwoNodes)


# -- processes --------------------------------------------------------------------------------

def probe_goodput(nodes: TwoNodes, rate: str) -> float:
    """TCP goodput A -> B in bit/s over ~1.5 s of a bulk transfer (see common.probe_goodput)."""
    return common.probe_goodput(nodes, rate, PROBE_PORT)


def worker_env(iface: str) -> dict:
    return common.repo_env(GLOO_SOCKET_IFNAME=iface, BENCH_IFACE=iface, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def launch(worker_args: list[str], *, nodes: TwoNodes | None, nproc_per_node: int,
           timeout_s: float = RUN_TIMEOUT_S, worker: Path = WORKER) -> dict:
    """Run ``worker`` (step_worker) under torchrun (two nodes across the veth, or one standalone); its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [str(worker), *worker_args, "--out", str(out)]
        if nodes is None:
            commands = [(None, "lo", common.torchrun_command(nproc_per_node, *args))]
        else:
            commands = []
            for i, (ns, iface, addr) in enumerate(zip(nodes.ns, nodes.iface, nodes.addr)):
                commands.append((ns, iface, common.torchrun_command(nproc_per_node, standalone=False) + [
                    "--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint={ADDR_A}:{RDZV_PORT}",
                    f"--rdzv_id=bench{os.getpid()}", f"--rdzv_conf=is_host={int(i == 0)}",
                    f"--local_addr={addr}",
                ] + args))
        procs, logs = [], []
        for ns, iface, cmd in commands:
            log = tempfile.TemporaryFile("w+")
            prefix = ["ip", "netns", "exec", ns] if ns else []
            procs.append(subprocess.Popen(prefix + cmd, env=worker_env(iface), stdout=log,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
            logs.append(log)
        common.wait_all(procs, logs, timeout_s, what="a benchmark process")
        return json.loads(out.read_text())


def launch_loopback(worker_args: list[str], private_ns: str | None, *, nproc: int = 2,
                    timeout_s: float = RUN_TIMEOUT_S, worker: Path = WORKER) -> dict:
    """``nproc`` processes on one node over ``lo`` (in a private namespace when given, for clean counters)."""
    if private_ns is None:
        return launch(worker_args, nodes=None, nproc_per_node=nproc, timeout_s=timeout_s, worker=worker)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = ["ip", "netns", "exec", private_ns,
               *common.torchrun_command(nproc, str(worker), *worker_args, "--out", str(out))]
        log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(cmd, env=worker_env("lo"), stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        common.wait_all([proc], [log], timeout_s, what="a benchmark process")
        return json.loads(out.read_text())


# -- the table --------------------------------------------------------------------------------

def summarize(report: dict) -> dict:
    """Per method: median step, speedup vs fp32, accounted and measured bytes per step; the ideal."""
    by_method = {r["method"]: r for r in report["results"]}
    t_fp32 = by_method["fp32"]["median_s"] if "fp32" in by_method else None
    t_compute = by_method["compute"]["median_s"] if "compute" in by_method else None
    ideal = None
    if t_fp32 and t_compute is not None:
        ideal = t_fp32 / (t_compute + max(0.0, t_fp32 - t_compute) / 32)
    rows = []
    iface = report.get("iface")
    # Over the veth only inter-node bytes pass (same-node ranks talk over lo); over lo, all of them.
    accounted_key = "bytes_total" if iface in (None, "lo") else "bytes_inter"
    for method in [r["method"] for r in report["results"] if r["method"] != "compute"]:
        result = by_method[method]
        ranks = result["ranks"]
        accounted_per_rank = statistics.mean(r["bytes"]["bytes_total"] for r in ranks)
        wire_nodes = [r for r in ranks if r["iface"] is not None]
        accounted_on_iface = sum(r["bytes"][accounted_key] for r in ranks) / max(1, len(wire_nodes))
        wire_tx = statistics.mean(r["iface"]["tx"] for r in wire_nodes) if wire_nodes else None
        packets = statistics.mean(r["iface"].get("tx_packets", 0) for r in wire_nodes) if wire_nodes else None
        rows.append({
            "method": method,
            "median_s": result["median_s"],
            "repeat_medians_s": result.get("repeat_medians_s", [result["median_s"]]),
            "speedup_vs_fp32": t_fp32 / result["median_s"] if t_fp32 else None,
            "accounted_bytes_per_rank": accounted_per_rank,
            "accounted_bytes_per_iface": accounted_on_iface,
            "wire_tx_bytes_per_iface": wire_tx,
            "wire_over_accounted": wire_tx / accounted_on_iface if wire_tx and accounted_on_iface else None,
            "wire_bytes_per_packet": wire_tx / packets if wire_tx and packets else None,
            "piece_log2": sorted({k for r in ranks for k in r.get("piece_log2", [])}),
        })
    hsdp = None
    if "hsdp_fp32" in by_method and "hsdp_local" in by_method:
        # FSDP2 on each node's ranks: native fp32 HSDP against each node alone (no exchange across nodes).
        t_native, t_local = by_method["hsdp_fp32"]["median_s"], by_method["hsdp_local"]["median_s"]
        hsdp = {"t_native_s": t_native, "t_local_s": t_local,
                "ideal_speedup": t_native / (t_local + max(0.0, t_native - t_local) / 32)}
        wire = {row["method"]: row["wire_tx_bytes_per_iface"] for row in rows}
        if "hsdp_birder" in by_method:
            speedup = t_native / by_method["hsdp_birder"]["median_s"]
            hsdp.update(birder_speedup=speedup, of_ideal=speedup / hsdp["ideal_speedup"])
            if wire.get("hsdp_birder") and wire.get("hsdp_fp32"):
                hsdp["wire_fraction_of_native"] = wire["hsdp_birder"] / wire["hsdp_fp32"]
    return {"t_compute_s": t_compute, "t_fp32_s": t_fp32, "ideal_speedup": ideal, "rows": rows, "hsdp": hsdp}


def merge_repeats(reports: list[dict]) -> dict:
    """The first launch's report with each method's median replaced by the median over launches."""
    report = reports[0]
    report["repeats"] = len(reports)
    for i, result in enumerate(report["results"]):
        medians = [r["results"][i]["median_s"] for r in reports]
        result["repeat_medians_s"] = medians
        result["median_s"], _, _ = common.median_range(medians)
    report["repeat_reports"] = reports[1:]
    return report


def _mb(value):
    return "n/a" if value is None else f"{value / 1e6:.3f}"


def _x(value):
    return "n/a" if value is None else f"{value:.2f}x"


def markdown_table(link: str, report: dict, summary: dict) -> str:
    lines = [
        f"### {link}, model `{report['model']}` ({report['num_params'] / 1e6:.1f}M parameters, "
        f"batch {report['batch_per_rank']} per rank, {report['world_size']} processes)",
        "",
        f"compute (DDP `no_sync`) {summary['t_compute_s'] * 1e3:.1f} ms/step; DDP fp32 "
        f"{summary['t_fp32_s'] * 1e3:.1f} ms/step; ideal speedup (1/32 of fp32's communication) "
        f"**{_x(summary['ideal_speedup'])}**. Timed steps {report['steps']} after {report['warmup']} "
        f"warm-up, methods round-robin, median of the slowest rank per step; {report.get('repeats', 1)} "
        f"launch(es), median of their medians (range in brackets). 1-min load average "
        f"{report.get('load_avg_before', float('nan')):.1f} before, {report.get('load_avg_after', float('nan')):.1f} after.",
        "",
        "| method | median step ms [range] | vs DDP fp32 | accounted MB/step/rank | accounted MB/step on "
        f"`{report['iface'] or 'n/a'}` | wire MB/step (tx counter) | wire / accounted | wire bytes/packet |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in summary["rows"]:
        speed = row["speedup_vs_fp32"]
        if link == "loopback" and speed is not None:
            speed_text = f"{1 / speed:.2f}x the time" if row["method"] != "fp32" else "1.00x"
        else:
            speed_text = _x(speed)
        ratio = row["wire_over_accounted"]
        per_packet = row["wire_bytes_per_packet"]
        spread = row["repeat_medians_s"]
        spread_text = f" [{min(spread) * 1e3:.0f}-{max(spread) * 1e3:.0f}]" if len(spread) > 1 else ""
        lines.append(
            f"| {row['method']} | {row['median_s'] * 1e3:.1f}{spread_text} | {speed_text} | "
            f"{_mb(row['accounted_bytes_per_rank'])} | {_mb(row['accounted_bytes_per_iface'])} | "
            f"{_mb(row['wire_tx_bytes_per_iface'])} | {'n/a' if ratio is None else f'{ratio:.3f}'} | "
            f"{'n/a' if per_packet is None else f'{per_packet:.0f}'} |"
        )
    hsdp = summary.get("hsdp")
    if hsdp:
        line = (f"HSDP (FSDP2 over each node's ranks): native fp32 HSDP {hsdp['t_native_s'] * 1e3:.1f} ms/step, each "
                f"node alone {hsdp['t_local_s'] * 1e3:.1f} ms/step; ideal speed-up of a 32x smaller exchange "
                f"**{_x(hsdp['ideal_speedup'])}**")
        if "birder_speedup" in hsdp:
            line += (f"; Birder 1-bit HSDP {_x(hsdp['birder_speedup'])} native's speed = "
                     f"**{hsdp['of_ideal']:.2f} of the ideal**")
        if "wire_fraction_of_native" in hsdp:
            line += (f"; bytes on the veth 1/{1 / hsdp['wire_fraction_of_native']:.1f} of native's")
        lines += ["", line + "."]
    pieces = [f"{row['method']} {'/'.join(f'2^{k}' for k in row['piece_log2'])}"
              for row in summary["rows"] if row.get("piece_log2")]
    if pieces:
        lines += ["", "Birder's CPU piece size, agreed by the ranks after each timed step (elements; "
                  f"`optim.engine.PIECE_SECONDS`): {', '.join(pieces)}."]
    return "\n".join(lines)


# Rows of the profile table in the order a Birder step runs them (longest matching prefix).
STAGE_ORDER = ("step (", "step: forward", "step: backward", "hook exchange", "hook compress", "hook reduce",
               "kernel compress",
               "  torch path: uniform", "  torch path: pack_bits", "gloo", "kernel unpack",
               "  torch path: unpack_bits", "kernel", "step: optimizer", "optimizer",
               "gloo all-reduce non-finite", "kernel apply_update_")


def _stage_order(name: str):
    matches = [(len(prefix), i) for i, prefix in enumerate(STAGE_ORDER) if name.startswith(prefix)]
    return (max(matches)[1] if matches else len(STAGE_ORDER)), name


def profile_markdown(report: dict) -> str:
    """Rank 0's per-stage wall ms per step, one column per method; then the top torch ops."""
    results = [r for r in report["results"] if r["ranks"][0].get("profile")]
    if not results:
        return ""
    stages = []
    for result in results:
        for name in result["ranks"][0]["profile"]["stages"]:
            if name not in stages:
                stages.append(name)
    methods = [r["method"] for r in results]
    lines = [
        f"Profile of rank 0 (`--profile`: wall ms per step of each wrapped function, summed over "
        f"threads; nested rows are contained in the row above them; a gloo stage includes waiting "
        f"for the peer). Instrumentation adds time: compare with the unprofiled table.",
        "",
        "| stage | " + " | ".join(methods) + " |",
        "| --- | " + " | ".join("---:" for _ in methods) + " |",
        "| step (median) | " + " | ".join(f"{r['median_s'] * 1e3:.1f}" for r in results) + " |",
    ]
    for name in sorted(stages, key=_stage_order):
        cells = []
        for result in results:
            entry = result["ranks"][0]["profile"]["stages"].get(name)
            cells.append("" if entry is None else f"{entry['ms']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for result in results:
        if result["method"] == "fp32" or result["method"] in step_worker.COLLECTIVES:
            ops = result["ranks"][0]["profile"]["ops"]
            lines += ["", f"torch.profiler, `{result['method']}`, rank 0, top operators by self CPU ms per step:", "",
                      "| op | self ms/step | calls/step |", "| --- | ---: | ---: |"]
            lines += [f"| `{op['op']}` | {op['self_ms']:.1f} | {op['calls']:.0f} |" for op in ops]
    return "\n".join(lines)


def write_results(runs: list[dict], machine: dict, command: str, out_stem: Path, failures=()) -> None:
    date = common.today()
    payload = {"date": date, "machine": machine, "command": command, "runs": runs, "failures": list(failures)}
    lines = [
        f"# Slow-link step time: {machine['cpu']}, {date}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB, Linux "
        f"{machine['kernel']}, Python {machine['python']}, torch {machine['torch']} (CPU, gloo); "
        f"1-min load average at start {machine['load_avg_1min_at_start']} (shared machine: timings are noisy).  ",
        "Two nodes = two network namespaces joined by a veth pair, egress of both ends shaped with "
        "`tc qdisc tbf` (burst = 1 ms of traffic, latency 50ms); one process per node, 1 torch thread each. "
        "`loopback`: 2 processes on one node over `lo`, unshaped.",
        "",
        "Columns: *accounted* = the project's `CommStats` (bytes a rank sends, ring model); "
        "*wire* = the tx counter of the interface (`/proc/net/dev` in the namespace), per node: "
        "headers, ACKs and barriers included. On the veth only inter-node bytes are compared.",
        "",
    ]
    shown = set()
    for run in runs:
        if run.get("goodput_bit_s") and run["link"] not in shown:
            shown.add(run["link"])
            lines.append(f"Link `{run['link']}`: measured TCP goodput {run['goodput_bit_s'] / 1e6:.0f} Mbit/s "
                         f"(tbf {run['link']}, burst {run['burst']}).")
            lines.append("")
        lines.append(markdown_table(run["link"], run["report"], run["summary"]))
        lines.append("")
        profile = profile_markdown(run["report"])
        if profile:
            lines += [profile, ""]
    for failure in failures:
        last = failure["error"].strip().splitlines()[-1] if failure["error"].strip() else ""
        lines += [f"### {failure['link']}, model `{failure['model']}`: FAILED", "", f"`{last[:300]}` (full text in the .json)", ""]
    common.write_results(out_stem, "\n".join(lines), payload)


# -- main -------------------------------------------------------------------------------------

def main(argv=None):
    plugins = step_worker.load_plugin_arg(argv)
    methods = step_worker.method_names(forms=False, hsdp=False)  # the default: every DDP method but forced forms
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", default=plugins,
                        help="comma-separated modules to import first (here and in every worker): the "
                             "collectives and baselines they register become methods")
    parser.add_argument("--links", nargs="+", default=LINKS, help="tc rates (100mbit, 1gbit, ...) and/or loopback")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(step_worker.MODELS))
    every = step_worker.method_names()
    parser.add_argument("--methods", default=",".join(methods), help=f"comma-separated, from {', '.join(every)}")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="processes per node on the shaped links (2 for the HSDP methods: FSDP2 shards "
                             "over a node's ranks)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: per link, see DEFAULT_STEPS)")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size for every method (25: DDP's default)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="launches per link and model; the table shows the median of their medians")
    parser.add_argument("--profile", action="store_true",
                        help="step_worker --profile: per-stage times and top torch ops (adds overhead)")
    parser.add_argument("--quick", action="store_true", help="smoke: tiny model, 1 timed step, 100mbit and loopback")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/slow_link_<machine>_<date>)")
    args = parser.parse_args(argv)
    if args.quick:
        args.links, args.models, args.steps = ["100mbit", "loopback"], ["tiny"], 1
    for link in args.links:
        if link != "loopback":
            rate_bits(link)  # validates
    shaped = [link for link in args.links if link != "loopback"]
    reason = netns_unavailable_reason()
    if shaped and reason:
        sys.exit(f"slow_link.py: {reason}")

    machine = common.machine_description()
    command = common.command_line("slow_link.py", argv)
    kind = "slow_link_profile" if args.profile else "slow_link"  # a profiled run never overwrites timings
    out_stem = Path(args.out) if args.out else common.results_path(kind, "", hardware=machine["cpu"])
    nodes = TwoNodes(f"dsb{os.getpid() % 100000}") if reason is None else None
    runs, failures = [], []
    try:
        for link in args.links:
            goodput = None
            if link != "loopback":
                nodes.shape(link)
                goodput = probe_goodput(nodes, link)
                print(f"[{link}] TCP goodput {goodput / 1e6:.0f} Mbit/s", flush=True)
            for model in args.models:
                steps = args.steps or DEFAULT_STEPS.get(link, 4)
                worker_args = ["--model", model, "--methods", args.methods, "--plugins", args.plugins,
                               "--steps", str(steps), "--warmup", str(args.warmup),
                               "--bucket-cap-mb", str(args.bucket_cap_mb)]
                if args.profile:
                    worker_args.append("--profile")
                started = time.monotonic()
                load_before = common.load_average()[0]
                reports = []
                try:
                    for _ in range(args.repeats):
                        if link == "loopback":
                            reports.append(launch_loopback(worker_args, nodes.ns[0] if nodes else None))
                        else:
                            reports.append(launch(worker_args, nodes=nodes, nproc_per_node=args.nproc_per_node))
                except RuntimeError as error:  # keep going: the other links and models still say something
                    print(f"[{link} {model}] FAILED:\n{error}", flush=True)
                    failures.append({"link": link, "model": model, "error": str(error)[-4000:]})
                    write_results(runs, machine, command, out_stem, failures)
                    continue
                report = merge_repeats(reports)
                report["load_avg_before"], report["load_avg_after"] = load_before, common.load_average()[0]
                summary = summarize(report)
                run = {"link": link, "burst": tbf_burst(link) if link != "loopback" else None,
                       "goodput_bit_s": goodput, "report": report, "summary": summary,
                       "wall_s": time.monotonic() - started}
                runs.append(run)
                print(markdown_table(link, report, summary) + f"\n({run['wall_s']:.0f} s)\n", flush=True)
                if args.profile:
                    print(profile_markdown(report) + "\n", flush=True)
                write_results(runs, machine, command, out_stem, failures)  # keep what is done so far
    finally:
        if nodes is not None:
            nodes.close()
    print(f"wrote {out_stem}.md and .json")


if __name__ == "__main__":
    main()
