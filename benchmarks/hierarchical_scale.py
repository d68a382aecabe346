"""How many bytes cross the node boundary per step, for each 1-bit collective, measured and at scale?

Measured: 2 nodes x 2 processes (two network namespaces joined by an
unshaped veth, two torchrun invocations with ``--nproc_per_node=2``; ranks of
one node talk over that namespace's ``lo``, so the veth carries exactly the
inter-node traffic). Per step and node: the inter-node bytes of the project's
accounting (``CommStats.bytes_inter`` summed over the node's ranks) and the
veth's tx counter, for DDP fp32 and Birder's ``allgather``, ``two_phase``
and ``hierarchical``. Without root it falls back to one torchrun with 4
processes on ``lo`` and ``--num-nodes 2`` (accounting only, no wire count).

On paper: the same accounting (:mod:`dist_supernet.comm.stats` and each
collective's ``wire_bytes``) for 8 GPUs per node at 1, 2, 8 and 64 nodes, for
a 25M and a 110M parameter model, and the communication time per step this
implies on 10 and 100 Gbit/s links. Assumptions (also written with the results):

- the gradient is reduced in DDP's buckets: 1 MiB first, then 25 MiB of fp32;
- one network link per node of the given rate, full duplex; the time is the
  bytes one node sends across the boundary / the rate (the busiest node;
  every node sends the same in these formulas);
- intra-node links (NVLink) cost nothing; no latency, no protocol headers
  (the measured veth shows about +7% for TCP/IP at MTU 1500), no overlap with
  compute: the step is at least max(compute, comm) and at most their sum;
- fp32 is the ring all-reduce the accounting models (NCCL's ring; its tree
  or NVLS algorithms send about as much per node).

Usage::

    python benchmarks/hierarchical_scale.py            # measured (root) + paper table
    python benchmarks/hierarchical_scale.py --paper-only
    python benchmarks/hierarchical_scale.py --quick    # tiny model, 1 timed step

Writes ``benchmarks/results/hierarchical_<date>.md`` and ``.json``.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from dist_supernet.comm import COLLECTIVES, CommGroups, Topology, WireBytes  # noqa: E402
from dist_supernet.comm.stats import all_reduce_bytes  # noqa: E402

GPUS_PER_NODE = 8
NODE_COUNTS = (1, 2, 8, 64, 128)  # up to 1024 GPUs
MODEL_PARAMS = (25_000_000, 110_000_000)
LINK_RATES_BIT_S = (10e9, 100e9)
FIRST_BUCKET_BYTES = 1 << 20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
BUCKET_CAP_BYTES = 25 << 20  # DDP's bucket_cap_mb=25
# (label, how the bytes are counted): fp32/fp16 a ring all-reduce of 4/2 bytes per element,
# the rest Birder's collectives through their own wire_bytes.
PAPER_METHODS = (
    ("fp32", ("all_reduce", 4)),
    ("fp16", ("all_reduce", 2)),
    ("allgather", ("collective", "allgather", False)),
    ("two_phase", ("collective", "two_phase", False)),
    ("two_phase+requantize", ("collective", "two_phase", True)),
    ("powersgd r4", ("powersgd", 4)),
    ("hierarchical allgather", ("collective", "hierarchical", False, "allgather")),
    ("hierarchical reduce_scatter", ("collective", "hierarchical", False, "reduce_scatter")),
    ("hierarchical (auto)", ("collective", "hierarchical", False, "auto")),
)
MEASURED_METHODS = ("fp32", *COLLECTIVES, "hierarchical_rs")  # every registered 1-bit collective, and the forced form
# PowerSGD's formula needs matrix shapes; the paper table assumes every parameter sits in square
# 1024 x 1024 matrices (a 25M/110M model of such layers): rank r sends P (1024 x r) and Q (1024 x r)
# in fp32 per matrix, each by a ring all-reduce, instead of the 2**20 elements.
POWERSGD_MATRIX_SIDE = 1024


def bucket_sizes(num_params: int) -> list[int]:
    """Elements per DDP bucket for a model of ``num_params`` fp32 parameters."""
    sizes, left = [], num_params
    cap = FIRST_BUCKET_BYTES // 4
    while left > 0:
        sizes.append(min(cap, left))
        left -= sizes[-1]
        cap = BUCKET_CAP_BYTES // 4
    return sizes


def node_wire_bytes(how: tuple, num_params: int, num_nodes: int, gpus_per_node: int) -> WireBytes:
    """Bytes the ranks of node 0 send in one step, by the project's accounting."""
    world = num_nodes * gpus_per_node
    total = WireBytes()
    for rank in range(gpus_per_node):
        topo = Topology(world_size=world, rank=rank, local_world_size=gpus_per_node)
        for numel in bucket_sizes(num_params):
            if how[0] == "all_reduce":
                total += all_reduce_bytes(numel * how[1], list(range(world)), topo)
            elif how[0] == "powersgd":
                factor_elems = numel / POWERSGD_MATRIX_SIDE**2 * 2 * POWERSGD_MATRIX_SIDE * how[1]
                total += all_reduce_bytes(factor_elems * 4, list(range(world)), topo)
            else:
                _, name, requantize, *form = how
                kwargs = {"inter_node": form[0]} if form else {}
                total += COLLECTIVES[name](topo, CommGroups(world=None), requantize=requantize,
                                           **kwargs).wire_bytes(numel)
    return total


def paper_table(model_params=MODEL_PARAMS, node_counts=NODE_COUNTS, gpus_per_node=GPUS_PER_NODE,
                rates_bit_s=LINK_RATES_BIT_S) -> list[dict]:
    """Inter-node bytes per node per step and the comm time they imply, from the byte formulas.

    Example::
        >>> row = paper_table([25_000_000], [2])[0]        # fp32, 25M parameters, 2 nodes x 8
        >>> round(row["inter_bytes_per_node"] / 1e6, 1)    # 2 * 15/16 * 100 MB
        187.5
    """
    rows = []
    for num_params in model_params:
        for num_nodes in node_counts:
            for label, how in PAPER_METHODS:
                wire = node_wire_bytes(how, num_params, num_nodes, gpus_per_node)
                rows.append({
                    "num_params": num_params,
                    "num_nodes": num_nodes,
                    "gpus_per_node": gpus_per_node,
                    "method": label,
                    "inter_bytes_per_node": wire.inter,
                    "intra_bytes_per_node": wire.intra,
                    "inter_bits_per_param": wire.inter * 8 / num_params,
                    "comm_s": {f"{rate / 1e9:g}gbit": wire.inter * 8 / rate for rate in rates_bit_s},
                })
    return rows


def paper_markdown(rows: list[dict]) -> str:
    rates = list(rows[0]["comm_s"])
    lines = [
        "| params | nodes x GPUs | method | inter-node MB/step/node | bits/param | vs fp32 | "
        + " | ".join(f"comm ms @ {r.replace('gbit', ' Gbit/s')}" for r in rates) + " |",
        "| ---: | ---: | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in rates) + " |",
    ]
    fp32 = {(r["num_params"], r["num_nodes"]): r["inter_bytes_per_node"] for r in rows if r["method"] == "fp32"}
    for row in rows:
        base = fp32[(row["num_params"], row["num_nodes"])]
        ratio = "-" if base == 0 else f"{row['inter_bytes_per_node'] / base:.3f}"
        lines.append(
            f"| {row['num_params'] / 1e6:.1f}M | {row['num_nodes']} x {row['gpus_per_node']} | {row['method']} | "
            f"{row['inter_bytes_per_node'] / 1e6:.2f} | {row['inter_bits_per_param']:.2f} | {ratio} | "
            + " | ".join(f"{row['comm_s'][r] * 1e3:.2f}" for r in rates) + " |"
        )
    return "\n".join(lines)


# -- measured ---------------------------------------------------------------------------------

def measure_2x2(args) -> dict:
    import slow_link

    worker_args = ["--model", "tiny" if args.quick else args.model, "--methods", ",".join(MEASURED_METHODS),
                   "--steps", str(1 if args.quick else args.steps), "--warmup", "2"]
    reason = slow_link.netns_unavailable_reason()
    if reason is None:
        nodes = slow_link.TwoNodes(f"dsh{os.getpid() % 100000}")
        try:
            report = slow_link.launch(worker_args, nodes=nodes, nproc_per_node=2)
        finally:
            nodes.close()
        report["how"] = "2 namespaces x torchrun --nproc_per_node=2, veth unshaped"
    else:
        print(f"hierarchical_scale.py: {reason}; measuring the accounting only "
              "(one torchrun, 4 processes on lo, --num-nodes 2)", flush=True)
        report = slow_link.launch(worker_args + ["--num-nodes", "2"], nodes=None, nproc_per_node=4)
        report["how"] = "1 torchrun --nproc_per_node=4 on lo, Birder(num_nodes=2): accounting only"
    rows = []
    for result in report["results"]:
        nodes_seen = sorted({r["node"] for r in result["ranks"]})
        per_node = []
        for node in nodes_seen:
            ranks = [r for r in result["ranks"] if r["node"] == node]
            leader = [r for r in ranks if r["iface"] is not None]
            per_node.append({
                "node": node,
                "accounted_inter": sum(r["bytes"]["bytes_inter"] for r in ranks),
                "accounted_intra": sum(r["bytes"]["bytes_intra"] for r in ranks),
                "wire_tx": leader[0]["iface"]["tx"] if leader else None,
            })
        rows.append({"method": result["method"], "median_s": result["median_s"], "per_node": per_node})
    return {"report": report, "rows": rows}


def measured_markdown(measured: dict) -> str:
    report = measured["report"]
    fp32 = next((r for r in measured["rows"] if r["method"] == "fp32"), None)
    fp32_inter = statistics.mean(n["accounted_inter"] for n in fp32["per_node"]) if fp32 else None
    lines = [
        f"{report['how']}; model `{report['model']}` ({report['num_params'] / 1e6:.1f}M parameters), "
        f"{report['world_size']} processes, {report['steps']} timed steps after {report['warmup']} warm-up. "
        "Per node and step (mean of the two nodes). The veth is unshaped, so its counter sees GSO "
        "super-packets (one TCP/IP header per up to 64 KB); a physical MTU-1500 link carries ~6.6% more "
        "(see the 100 Mbit/s rows of slow_link). Step times: 4 processes on 2 cores, for reference only.",
        "",
        "| method | accounted inter-node MB | accounted intra-node MB | veth tx MB | veth / accounted | "
        "inter vs fp32 (accounted) | veth vs fp32 | median step ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    fp32_wire = None
    if fp32 and all(n["wire_tx"] is not None for n in fp32["per_node"]):
        fp32_wire = statistics.mean(n["wire_tx"] for n in fp32["per_node"])
    for row in measured["rows"]:
        inter = statistics.mean(n["accounted_inter"] for n in row["per_node"])
        intra = statistics.mean(n["accounted_intra"] for n in row["per_node"])
        wires = [n["wire_tx"] for n in row["per_node"]]
        wire = statistics.mean(wires) if all(w is not None for w in wires) else None
        lines.append(
            f"| {row['method']} | {inter / 1e6:.3f} | {intra / 1e6:.3f} | "
            f"{'n/a' if wire is None else f'{wire / 1e6:.3f}'} | "
            f"{'n/a' if wire is None or not inter else f'{wire / inter:.3f}'} | "
            f"{'n/a' if not fp32_inter else f'{inter / fp32_inter:.4f}'} | "
            f"{'n/a' if wire is None or not fp32_wire else f'{wire / fp32_wire:.4f}'} | "
            f"{row['median_s'] * 1e3:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper-only", action="store_true", help="the formula table only, no processes")
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn", "tiny"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps of the 2x2 measurement")
    parser.add_argument("--quick", action="store_true", help="smoke: tiny model, 1 timed step")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/hierarchical_<date>)")
    args = parser.parse_args(argv)

    date = common.today()
    rows = paper_table()
    paper = paper_markdown(rows)
    print(paper, flush=True)
    measured = None
    if not args.paper_only:
        started = time.monotonic()
        measured = measure_2x2(args)
        print(measured_markdown(measured) + f"\n({time.monotonic() - started:.0f} s)", flush=True)
        # The same formulas at the measured size, to check the table's arithmetic against the run.
        check = paper_table([measured["report"]["num_params"]], [2], gpus_per_node=2, rates_bit_s=[1e9])
        measured["formula_2x2"] = check

    machine = common.machine_description()
    out_stem = Path(args.out) if args.out else common.results_path("hierarchical", "", date=date)
    command = common.command_line("hierarchical_scale.py", argv)
    payload = {"date": date, "machine": machine, "command": command, "paper": rows, "measured": measured}
    lines = [
        f"# Hierarchical 1-bit all-reduce at scale: inter-node bytes, {date}",
        "",
        f"Command: `{command}`  ",
        f"Machine (measured part): {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB, "
        f"torch {machine['torch']} (CPU, gloo); 1-min load average at start {machine['load_avg_1min_at_start']}.",
        "",
    ]
    if measured is not None:
        lines += ["## Measured: 2 nodes x 2 processes", "", measured_markdown(measured), "",
                  "Same formulas as the paper table at this size (2 nodes x 2, one step):", "",
                  paper_markdown(measured["formula_2x2"]), ""]
    lines += [
        "## On paper: 8 GPUs per node",
        "",
        "From the project's byte accounting (`dist_supernet.comm.stats`, each collective's `wire_bytes`), "
        "gradient in DDP buckets (1 MiB first, then 25 MiB). *inter-node MB/step/node*: what one node "
        "sends across its boundary per step (every node sends the same). *comm ms*: that / the link "
        "rate, one full-duplex link per node, NVLink free, no latency or header overhead, no overlap "
        "with compute (the step is at least max(compute, comm), at most compute + comm). fp32/fp16: "
        "ring all-reduce. `two_phase` sends exact counts in its second phase "
        "(ceil(log2(n+1)) bits per element), `+requantize` one bit.",
        "",
        "Reading: `hierarchical allgather` (the form of 2026-11-22) exchanges between nodes by an "
        "all-gather of each node's 1-bit chunk, so a node sends N - 1 bits per parameter: 1 bit at 2 nodes, "
        "7 at 8, 63 at 64, 127 at 128 nodes, beyond fp32's ring (~64 bits). `hierarchical reduce_scatter` "
        "(all-to-all of 1-bit sub-chunks between the nodes, exact count per owner, one re-quantised bit, "
        "all-gather of it) sends 2 (N - 1) / N bits: 1 at 2 nodes, at most 2 at any N. `auto` (the default) "
        "takes allgather at N <= 2 (the same bytes, one round fewer, no second re-quantisation) and "
        "reduce_scatter beyond. `powersgd r4` assumes 1024 x 1024 matrices (see POWERSGD_MATRIX_SIDE): "
        "0.5 bits per parameter in its factors, fewer bytes than any 1-bit scheme, at the price of its "
        "error feedback memory and two matrix products per layer. `two_phase` stays at 9-18 bits per "
        "parameter per node (its all-to-all sends ~1 bit per parameter per local rank across the boundary), "
        "`+requantize` at 5-9.",
        "",
        paper,
        "",
    ]
    common.write_results(out_stem, "\n".join(lines), payload)
    print(f"wrote {out_stem}.md and .json")


if __name__ == "__main__":
    main()
