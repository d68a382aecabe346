"""How close to memory bandwidth are Birder's compression kernels?

For each bucket size and kernel: time, the bytes the kernel must move (its
minimum traffic: every input read once, every output written once), achieved
GB/s, and the ratio to the device's copy bandwidth measured in the same run
(``dst.copy_(src)`` on fp32 tensors of the same number of elements, which
moves 8 bytes per element). On CUDA both the Triton kernels and the torch
reference path are timed with ``triton.testing.do_bench`` (median); on CPU
only the torch path runs (Triton needs a GPU; the interpreter is for tests),
timed as the median of ``--repeats`` wall-clock runs.

Usage::

    python benchmarks/bench_kernels.py                     # CPU: 1M..16M, GPU: 1M..256M elements
    python benchmarks/bench_kernels.py --sizes 1M 64M --rows 16

Writes ``benchmarks/results/kernels_<hardware>_<date>.md`` (``--out`` to override).
"""

import argparse
import datetime
import importlib
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from kernels import reference as ref

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GPU_SIZES = ["1M", "4M", "16M", "64M", "256M"]
CPU_SIZES = ["1M", "4M", "16M"]  # the CPU torch path needs ~1 s per kernel at 16M on 2 cores


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not match:
        raise ValueError(f"--sizes {text!r}: expected a number with an optional K/M/G suffix, e.g. 16M")
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
        if model:
            return model.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def make_timer(device: torch.device, repeats: int):
    """fn -> median seconds per call."""
    if device.type == "cuda":
        import triton.testing

        def time_cuda(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3

        return time_cuda

    def time_cpu(fn):
        fn()  # warm-up: first-touch page faults, allocator
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return time_cpu


def triton_launchers() -> SimpleNamespace:
    """The Triton launchers under the reference's names (imported only on CUDA)."""
    where = {
        "compress": "compress",
        "unpack_mean": "unpack_mean",
        "unpack_counts": "unpack_mean",
        "pack_counts": "pack_counts",
        "unpack_planes": "unpack_planes",
        "requantize": "requantize",
        "apply_update_": "apply_update",
        "apply_packed_": "apply_packed",
    }
    return SimpleNamespace(
        **{name: getattr(importlib.import_module(f"kernels.ops.{module}"), name) for name, module in where.items()}
    )


def kernel_cases(numel: int, num_rows: int, device: torch.device, g_dtype: torch.dtype):
    """(name, bytes moved per element, {path: fn}) for every kernel at this size."""
    num_planes = ref.count_bits(num_rows)
    num_bytes = ref.num_bytes(numel)
    g = torch.randn(numel, device=device).to(g_dtype)
    m = torch.zeros(numel, device=device)
    b = torch.zeros(numel, device=device)
    index = torch.arange(numel, dtype=torch.int32, device=device)
    rows = torch.randint(0, 256, (num_rows, num_bytes), dtype=torch.uint8, device=device)
    counts = torch.randint(0, num_rows + 1, (numel,), dtype=torch.int32, device=device)
    planes = ref.pack_counts(counts, num_planes)
    x = torch.randn(numel, device=device)
    update = ref.unpack_mean(rows, numel)
    g_size = torch.finfo(g_dtype).bits / 8

    paths = {"torch": ref}
    if device.type == "cuda":
        paths["triton"] = triton_launchers()

    def per_path(make):
        return {path: make(impl) for path, impl in paths.items()}

    return [
        # g read, m and b read + written, index read, 1 bit written
        ("compress", g_size + 4 * 2 + 4 * 2 + 4 + 1 / 8,
         per_path(lambda k: lambda: k.compress(g, m, b, index, beta=0.9, seed=1))),
        # N bits read, fp32 written
        ("unpack_mean", num_rows / 8 + 4, per_path(lambda k: lambda: k.unpack_mean(rows, numel))),
        ("unpack_counts", num_rows / 8 + 4, per_path(lambda k: lambda: k.unpack_counts(rows, numel))),
        # int32 read, K bits written
        ("pack_counts", 4 + num_planes / 8, per_path(lambda k: lambda: k.pack_counts(counts, num_planes))),
        ("unpack_planes", num_planes / 8 + 4, per_path(lambda k: lambda: k.unpack_planes(planes, numel))),
        # int32 count and index read, 1 bit written
        ("requantize", 4 + 4 + 1 / 8, per_path(lambda k: lambda: k.requantize(counts, num_rows, index, seed=2))),
        # x and update read, x written
        ("apply_update_", 12, per_path(lambda k: lambda: k.apply_update_(x, update, lr=1e-9, weight_decay=0.01))),
        # N bits and x read, x written
        ("apply_packed_", num_rows / 8 + 8,
         per_path(lambda k: lambda: k.apply_packed_(x, rows, lr=1e-9, weight_decay=0.01))),
        # the unfused pair apply_packed_ replaces: unpack_mean then apply_update_
        ("unpack_mean + apply_update_", num_rows / 8 + 4 + 12,
         per_path(lambda k: lambda: k.apply_update_(x, k.unpack_mean(rows, numel), lr=1e-9, weight_decay=0.01))),
    ]


def copy_seconds(numel: int, device: torch.device, timer) -> tuple[float, float]:
    """Seconds for the device-to-device copy baseline: (into a fresh empty_like, into a preallocated buffer)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return timer(lambda: torch.empty_like(src).copy_(src)), timer(lambda: dst.copy_(src))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", help="bucket sizes in elements, e.g. 1M 16M 256M")
    parser.add_argument("--rows", type=int, default=8, help="packed rows N reduced by the unpack kernels (ranks)")
    parser.add_argument("--repeats", type=int, default=5, help="CPU only: timed runs per measurement")
    parser.add_argument("--g-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="CPU only: torch intra-op threads (default: torch's choice); "
                        "1 gives stable numbers on a machine shared with other jobs")
    parser.add_argument("--out", type=Path, help="Markdown output path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [parse_size(s) for s in (args.sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES))]
    g_dtype = getattr(torch, args.g_dtype)
    timer = make_timer(device, args.repeats)
    load_average = os.getloadavg()[0]
    hardware = hardware_name(device)
    today = datetime.date.today().isoformat()

    copy_rows, kernel_rows = [], []
    for numel in sizes:
        copy_fresh_s, copy_s = copy_seconds(numel, device, timer)
        copy_gbs = 8 * numel / copy_s / 1e9
        copy_rows.append((numel, copy_fresh_s, 8 * numel / copy_fresh_s / 1e9, copy_s, copy_gbs))
        print(f"{numel:>11,} copy: {copy_gbs:7.1f} GB/s (fresh empty_like: {copy_rows[-1][2]:.1f} GB/s)", flush=True)
        for name, bytes_per_element, fns in kernel_cases(numel, args.rows, device, g_dtype):
            for path, fn in fns.items():
                seconds = timer(fn)
                gbs = bytes_per_element * numel / seconds / 1e9
                kernel_rows.append((name, numel, path, seconds, bytes_per_element, gbs, gbs / copy_gbs))
                print(f"{numel:>11,} {name:<28} {path:<6} {seconds * 1e3:9.3f} ms {seconds / numel * 1e9:7.2f} ns/el "
                      f"{gbs:7.1f} GB/s {gbs / copy_gbs:6.1%} of copy", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    lines = [
        f"# Kernel bandwidth: {hardware}, {today}",
        "",
        f"Command: `python {' '.join(['benchmarks/bench_kernels.py', *(argv if argv is not None else sys.argv[1:])])}`  ",
        f"torch {torch.__version__}, device {device.type}, torch threads {torch.get_num_threads()}, "
        f"N = {args.rows} packed rows, K = {ref.count_bits(args.rows)} bit planes, g {args.g_dtype}"
        + (f", 1-min load average at start {load_average:.2f} on {os.cpu_count()} cores (shared machine: "
           "numbers are noisy)" if device.type == "cpu" else "") + ".  ",
        "Timing: " + ("`triton.testing.do_bench` median." if device.type == "cuda"
                      else f"median of {args.repeats} wall-clock runs after one warm-up; torch path only "
                           "(the Triton kernels need a GPU)."),
        "",
        "Bytes/el is the minimum traffic of each kernel (inputs read once, outputs written once); "
        "GB/s = bytes / time; `of copy` divides by the preallocated-copy GB/s at the same size.",
        "",
        "## Copy baseline (fp32, 8 bytes per element)",
        "",
        "| elements | empty_like(x).copy_(x) ms | GB/s | dst.copy_(x) ms | GB/s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for numel, fresh_s, fresh_gbs, copy_s, copy_gbs in copy_rows:
        lines.append(f"| {numel:,} | {fresh_s * 1e3:.3f} | {fresh_gbs:.1f} | {copy_s * 1e3:.3f} | {copy_gbs:.1f} |")
    lines += [
        "",
        "## Kernels",
        "",
        "| kernel | elements | path | ms | ns/el | bytes/el | GB/s | of copy |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, numel, path, seconds, bytes_per_element, gbs, ratio in kernel_rows:
        lines.append(f"| {name} | {numel:,} | {path} | {seconds * 1e3:.3f} | {seconds / numel * 1e9:.2f} | "
                     f"{bytes_per_element:.3f} | {gbs:.1f} | {ratio:.1%} |")
    out = args.out or RESULTS_DIR / f"kernels_{slug(hardware)}_{today}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
