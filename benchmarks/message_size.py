"""Below what message size per peer does a 1-bit collective stop being bandwidth bound?

Question (issue 12): with n ranks, ``two_phase`` sends D / (8 n) bytes to each
peer for a bucket of D elements, so at scale the messages shrink (1.6 KB with
25 MB buckets on 512 ranks) and per-message latency takes over. This script
times gloo's ``all_to_all_single`` (the collective of ``two_phase``'s first
phase) between 2 processes for per-peer sizes from 1 KiB to 4 MiB and reports
the throughput of each size against the largest size's, and the smallest size
that reaches half of it (the knee). The trainer sizes Birder's DDP buckets
from that knee (``dist_supernet.train.trainer.birder_bucket_cap_mb``).

Usage::

    python benchmarks/message_size.py            # loopback, 2 processes

Writes ``benchmarks/results/message_size_<date>.md``.
"""

import statistics
import time

import torch
import torch.distributed as dist

import common

SIZES = [1 << k for k in range(10, 23)]  # 1 KiB .. 4 MiB per peer


def _worker(rank, world_size, port, out):
    torch.set_num_threads(1)
    common.init_loopback_gloo(rank, world_size, port)
    results = {}
    for size in SIZES:
        send = torch.zeros(size * world_size, dtype=torch.uint8)
        recv = torch.empty_like(send)
        repeats = max(5, min(200, (64 << 20) // (size * world_size)))
        times = []
        for _ in range(3):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(repeats):
                dist.all_to_all_single(recv, send)
            times.append((time.perf_counter() - start) / repeats)
        results[size] = statistics.median(times)
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def main():
    times = common.spawn_gloo(_worker, 2, 29655)
    best = SIZES[-1] / times[SIZES[-1]]
    knee = next(size for size in SIZES if size / times[size] >= 0.5 * best)
    cpu = common.cpu_name()
    date = common.today()
    lines = [f"# Per-peer message size vs throughput, gloo all_to_all_single, 2 processes on loopback, {date}", "",
             f"`python benchmarks/message_size.py` on {cpu}, load average {common.load_average()[0]:.2f} (shared machine).", "",
             "| bytes per peer | us per call | MB/s per peer | vs 4 MiB |", "| ---: | ---: | ---: | ---: |"]
    for size in SIZES:
        rate = size / times[size]
        lines.append(f"| {size:,} | {times[size] * 1e6:.1f} | {rate / 1e6:.1f} | {rate / best:.2f} |")
    lines += ["", f"Knee (smallest size at >= half the 4 MiB throughput): **{knee:,} bytes per peer**.", ""]
    path = common.results_path("message_size", date=date)
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
