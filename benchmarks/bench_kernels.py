"""How close to memory bandwidth are Birder's kernels, per backend, next to a plain copy?

For each chunk size and every op of :data:`dist_supernet.kernels.registry.OPS` (the one op table): the
time of each backend, the bytes the op must move (its minimum traffic: every input read
once, every output written once), ns per element, GB/s, and the ratio to the copy
bandwidth measured in the same run at the same size (``dst.copy_(src)`` on fp32, 8 bytes
per element). CPU: the numba kernels and the torch reference, each on ``--threads``
threads (default 1: the issue-9 target is >= 40% of copy bandwidth on one thread), timed
as the median of ``--repeats`` wall-clock runs after one warm-up. CUDA: the Triton kernels
and the torch reference, timed with ``triton.testing.do_bench`` (median), each Triton case
tuned first (``kernels.tuning()``; ``DIST_SUPERNET_AUTOTUNE=0`` keeps the default configs).

The chunk is laid out as a model's bucket would be: ``--segments`` parameters of uneven
sizes whose canonical order differs from their chunk order, m and b the whole model's
canonical state, N = ``--rows`` packed rows (ranks) for the decoders.

Usage::

    python benchmarks/bench_kernels.py                      # CPU: 1M and 10.5M elements
    python benchmarks/bench_kernels.py --sizes 1M 64M --rows 8

Writes ``benchmarks/results/kernels_<hardware>_<date>.md`` (``--out`` to override).
"""

import argparse
import os
import re
import time
from pathlib import Path

import torch

import common
from dist_supernet import kernels
from dist_supernet.kernels import reference as ref
from dist_supernet.kernels.registry import OPS, implementation

GPU_SIZES = ["1M", "16M", "64M", "256M"]
CPU_SIZES = ["1M", "10.5M"]  # 10.5M: the MLP of benchmarks/slow_link.py (issue 9)
RHT_BLOCK = 1024  # sync.quantizers.OneBit's default block
NOT_TIMED = {"unpack_bits": "reference only (tests and debugging; never on the hot path)"}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)", text.strip().upper())
    if not match:
        raise ValueError(f"--sizes {text!r}: expected a number with an optional K/M/G suffix, e.g. 10.5M")
    return int(float(match.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match.group(2)])


def hardware_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else common.cpu_name()


def make_timer(device: torch.device, repeats: int):
    """fn -> (median, best) seconds per call.

    On a shared CPU the median carries the other jobs' load; the best of the runs is the
    least disturbed one, so both are reported (ratios to the copy for each).
    """
    if device.type == "cuda":
        import triton.testing

        def time_cuda(fn):
            median, best = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.0])
            return median * 1e-3, best * 1e-3

        return time_cuda

    def time_cpu(fn):
        fn()  # warm-up: compile / cache load, first-touch page faults, allocator
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        median, best, _ = common.median_range(samples)
        return median, best

    return time_cpu


def segment_sizes(numel: int, num_segments: int) -> list[int]:
    """Uneven parameter sizes summing to numel (a few big weights, many small biases)."""
    weights = torch.linspace(1.0, 0.01, num_segments) ** 3
    sizes = (weights / weights.sum() * numel).long().clamp_min(1)
    sizes[0] += numel - int(sizes.sum())
    return sizes.tolist()


def cases(numel: int, num_rows: int, num_segments: int, device: torch.device):
    """{op name: (bytes moved per element, {label: make(impl) -> fn})}; every op of OPS but NOT_TIMED."""
    sizes = segment_sizes(numel, num_segments)
    # canonical order = segments reversed: chunk position and canonical index differ, as in a DDP bucket
    canon_starts, at = [0] * len(sizes), 0
    for s in reversed(range(len(sizes))):
        canon_starts[s], at = at, at + sizes[s]
    starts, canon = ref.index_map(sizes, canon_starts, device=device)
    num_planes = ref.count_bits(num_rows)
    g = torch.randn(numel, device=device)
    m, b = torch.zeros(numel, device=device), torch.zeros(numel, device=device)
    mask = torch.rand(numel, device=device) < 0.9
    rows = torch.randint(0, 256, (num_rows, ref.num_bytes(numel)), dtype=torch.uint8, device=device)
    counts = torch.randint(0, num_rows + 1, (numel,), dtype=torch.int32, device=device)
    planes = ref.pack_counts(counts.cpu(), num_planes).to(device)
    bools = torch.rand(numel, device=device) < 0.5
    x = torch.randn(numel, device=device)
    xs = list(x.split(sizes))
    update = torch.randn(numel, device=device)
    lr_P = torch.full((len(sizes),), 1e-9, device=device)
    wd_P = torch.full((len(sizes),), 0.01, device=device)
    index = torch.arange(numel, device=device)
    counts_out = torch.empty(numel, dtype=torch.int32, device=device)
    mean_out = torch.empty(numel, device=device)
    blocks = ref.num_blocks(numel, RHT_BLOCK)
    onebit_bits = torch.randint(0, 256, (num_rows, blocks * RHT_BLOCK // 8), dtype=torch.uint8, device=device)
    onebit_scales = torch.rand(num_rows, blocks, device=device)

    def compress(k):
        return lambda: k(g, m, b, starts, canon, beta=0.9, seed=1)

    def compress_masked(k):
        return lambda: k(g, m, b, starts, canon, beta=0.9, seed=1, mask_T=mask)

    return {
        # g read, m and b read + written, 1 bit written (+1 byte of mask read)
        "compress": (4 + 16 + 1 / 8, {"": compress, " (mask_T)": compress_masked}),
        # count read, 1 bit written
        "requantize": (4 + 1 / 8, {"": lambda k: lambda: k(counts, num_rows, starts, canon, 0, seed=2)}),
        "uniform": (8 + 4, {" (fresh output)": lambda k: lambda: k(index, 5)}),  # a test helper: no out=
        "pack_bits": (1 + 1 / 8, {"": lambda k: lambda: k(bools)}),
        # N bits read, int32 / fp32 written: into out= (the kernel), and into a fresh tensor (as called
        # without out=, paying first-touch page faults on the 4 bytes per element)
        "unpack_counts": (num_rows / 8 + 4, {"": lambda k: lambda: k(rows, numel, out=counts_out),
                                             " (fresh output)": lambda k: lambda: k(rows, numel)}),
        "unpack_mean": (num_rows / 8 + 4, {"": lambda k: lambda: k(rows, numel, out=mean_out),
                                           " (fresh output)": lambda k: lambda: k(rows, numel)}),
        "counts_to_mean": (4 + 4, {"": lambda k: lambda: k(counts, num_rows, out=mean_out),
                                   " (fresh output)": lambda k: lambda: k(counts, num_rows)}),
        # int32 read, K bits written
        "pack_counts": (4 + num_planes / 8, {"": lambda k: lambda: k(counts, num_planes)}),
        "unpack_planes": (num_planes / 8 + 4, {"": lambda k: lambda: k(planes, numel, out=counts_out),
                                               " (fresh output)": lambda k: lambda: k(planes, numel)}),
        # x and update read, x written
        "apply_update_": (12, {"": lambda k: lambda: k(x, update, lr=1e-9, weight_decay=0.01)}),
        # N bits and x read, x written
        "apply_packed_": (num_rows / 8 + 8, {"": lambda k: lambda: k(xs, starts, canon, rows, planes=False,
                                                                     num_rows=num_rows, lr_P=lr_P, wd_P=wd_P)}),
        # the rotation and one-bit estimator of sync=diloco (blocks of 1024, its default); the padding of the
        # last block is not counted. x read, rotated x written (fresh outputs: no out=)
        "rht": (8, {" (fresh output)": lambda k: lambda: k(x, 3, RHT_BLOCK)}),
        # x read, 1 bit (+ a scale per block) written
        "onebit_encode": (4 + 1 / 8, {" (fresh output)": lambda k: lambda: k(x, 3, RHT_BLOCK)}),
        # N bits read, the float32 mean written
        "onebit_decode": (num_rows / 8 + 4, {" (fresh output)": lambda k: lambda: k(onebit_bits, onebit_scales, numel,
                                                                                    3, RHT_BLOCK)}),
    }


def copy_timer(numel: int, device: torch.device, timer):
    """() -> (median, best) seconds of one fp32 dst.copy_(src) of numel elements, timed when called."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return lambda: timer(lambda: dst.copy_(src))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", help="chunk sizes in elements, e.g. 1M 10.5M 256M")
    parser.add_argument("--rows", type=int, default=2, help="packed rows N reduced by the decoders (ranks)")
    parser.add_argument("--segments", type=int, default=32, help="parameters per chunk")
    parser.add_argument("--repeats", type=int, default=7, help="CPU only: timed runs per measurement")
    parser.add_argument("--threads", type=int, default=1, help="CPU only: threads for torch and numba (default 1)")
    parser.add_argument("--out", type=Path, help="Markdown output path")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    compiled = "triton" if device.type == "cuda" else "numba"
    backends = ["torch", compiled]
    if compiled == "numba":
        kernels.warmup("cpu")  # load (or compile) every numba kernel outside the timings
    sizes = [parse_size(s) for s in (args.sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES))]
    timer = make_timer(device, args.repeats)
    load_before = common.load_average()
    hardware = hardware_name(device)
    now = common.utc_now()

    copy_rows, kernel_rows = [], []
    for numel in sizes:
        time_copy = copy_timer(numel, device, timer)
        copy_s, _ = time_copy()
        copy_gbs = 8 * numel / copy_s / 1e9
        copy_rows.append((numel, copy_s, copy_gbs))
        print(f"{numel:>11,} copy: {copy_s / numel * 1e9:.2f} ns/el {copy_gbs:7.1f} GB/s", flush=True)
        table = cases(numel, args.rows, args.segments, device)
        missing = set(OPS) - set(table) - set(NOT_TIMED)
        assert not missing, f"bench_kernels has no case for {sorted(missing)}"
        for name, (bytes_per_element, variants) in table.items():
            for label, make in variants.items():
                for backend in backends:
                    # the copy is timed again right before each kernel: on a shared machine the load
                    # drifts within a run, and the ratio should compare the two at the same moment
                    run = make(implementation(name, backend))
                    if backend == "triton" and device.type == "cuda":
                        with kernels.tuning():  # pick the config for this size first (benchmark buffers only)
                            run()
                    near_copy_s, near_copy_best = time_copy()
                    seconds, best = timer(run)
                    gbs = bytes_per_element * numel / seconds / 1e9
                    ratio = (bytes_per_element / seconds) / (8 / near_copy_s)
                    ratio_best = (bytes_per_element / best) / (8 / near_copy_best)
                    kernel_rows.append((name + label, numel, backend, seconds, bytes_per_element, gbs,
                                        near_copy_s, ratio, best, near_copy_best, ratio_best))
                    print(f"{numel:>11,} {name + label:<20} {backend:<6} {seconds * 1e3:9.3f} ms "
                          f"{seconds / numel * 1e9:7.2f} ns/el {gbs:6.2f} GB/s {ratio:6.1%} of copy "
                          f"(copy {near_copy_s / numel * 1e9:.2f} ns/el); best {best / numel * 1e9:.2f} ns/el "
                          f"{ratio_best:6.1%} of the best copy", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    load_after = common.load_average()

    speedups = {}
    for name, numel, backend, seconds, *_ in kernel_rows:  # medians
        speedups.setdefault((name, numel), {})[backend] = seconds
    lines = [
        f"# Kernel bandwidth: {hardware}, {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{common.command_line('bench_kernels.py', argv)}`  ",
        f"torch {torch.__version__}, device {device.type}, backends {' vs '.join(backends)}"
        + (f", {args.threads} thread(s) for both (torch.set_num_threads)" if device.type == "cpu" else "")
        + f"; chunk of {args.segments} parameters (uneven sizes, canonical order reversed), N = {args.rows} packed "
        f"rows, K = {ref.count_bits(args.rows)} bit planes, g float32.  ",
        (f"Load average (1, 5, 15 min) {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} at start, "
         f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} at the end, on {os.cpu_count()} cores. "
         "The machine is shared with other engineers' jobs: every number here is noisy; each kernel's copy is "
         "timed right before it, so each ratio compares the two under the same load.  " if device.type == "cpu" else ""),
        "Timing: " + ("`triton.testing.do_bench` median and minimum." if device.type == "cuda"
                      else f"median and best (minimum) of {args.repeats} wall-clock runs after one warm-up; the "
                           "`best` columns compare the least disturbed kernel run with the least disturbed copy "
                           "run timed just before it."),
        "",
        "Bytes/el is the minimum traffic of each op (inputs read once, outputs written once); "
        "GB/s = bytes / time; `of copy` divides by the GB/s of a same-size copy (`dst.copy_(src)`, fp32, "
        "8 bytes per element) timed right before that kernel (column `copy ns/el`), so both see the same load. "
        "Target (issue 9): every CPU kernel >= 40% of copy on one thread. At 1M elements everything fits in "
        "the L3 cache, so the copy there runs at cache, not memory, bandwidth.",
        "",
        "## Copy baseline at the start of each size (fp32, 8 bytes per element)",
        "",
        "| elements | ms | ns/el | GB/s |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for numel, copy_s, copy_gbs in copy_rows:
        lines.append(f"| {numel:,} | {copy_s * 1e3:.3f} | {copy_s / numel * 1e9:.2f} | {copy_gbs:.1f} |")
    lines += [
        "",
        "## Kernels",
        "",
        f"| op | elements | backend | ms | ns/el | bytes/el | GB/s | copy ns/el | of copy | best ns/el | "
        f"best copy ns/el | best of copy | {compiled} speed-up |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (name, numel, backend, seconds, bytes_per_element, gbs, near_copy_s, ratio, best, near_copy_best,
         ratio_best) in kernel_rows:
        pair = speedups[(name, numel)]
        speedup = f"{pair['torch'] / pair[compiled]:.1f}x" if backend == compiled else ""
        lines.append(f"| {name} | {numel:,} | {backend} | {seconds * 1e3:.3f} | {seconds / numel * 1e9:.2f} | "
                     f"{bytes_per_element:.3f} | {gbs:.2f} | {near_copy_s / numel * 1e9:.2f} | {ratio:.1%} | "
                     f"{best / numel * 1e9:.2f} | {near_copy_best / numel * 1e9:.2f} | {ratio_best:.1%} | {speedup} |")
    lines += ["", "Not timed: " + "; ".join(f"`{k}`: {v}" for k, v in NOT_TIMED.items()) + "."]
    out = args.out or common.results_path("kernels", hardware=hardware, date=f"{now:%Y-%m-%d}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
