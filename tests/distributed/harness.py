"""Spawn real gloo processes for a test: file-store rendezvous, loopback, a timeout.

Each spawn costs seconds on 2 cores (every process imports torch), so tests
group several checks into one worker function. A worker is a module-level
function ``fn(rank, world_size, *args) -> picklable``; ``run_workers`` returns
the list of per-rank results, or raises with the failing rank's traceback.
"""

import multiprocessing
import os
import socket
import tempfile
import traceback
from datetime import timedelta

import pytest


def _entry(fn, rank, world_size, init_file, env, args, results):
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=float(env.get("TEST_PG_TIMEOUT_S", 90))),
        )
        try:
            results.put((rank, "ok", fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_workers(fn, world_size, *args, timeout_s=180, local_world_size=None, env=None, expect_ranks=None):
    """Run ``fn`` on ``world_size`` gloo processes; return their results in rank order.

    ``expect_ranks``: wait only for these ranks (fault tests whose other ranks are
    stopped or killed on purpose); the rest are killed at the end, results None.
    """
    expect_ranks = list(range(world_size)) if expect_ranks is None else list(expect_ranks)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child_env = {
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "LOCAL_WORLD_SIZE": str(local_world_size or world_size),
        "MASTER_ADDR": "127.0.0.1",
    }
    child_env.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            context.Process(target=_entry, args=(fn, rank, world_size, init_file, child_env, args, results))
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        collected = {}
        try:
            while not all(r in collected for r in expect_ranks):
                rank, status, value = results.get(timeout=timeout_s)
                if status == "error":
                    pytest.fail(f"rank {rank} failed:\n{value}", pytrace=False)
                collected[rank] = value
        except Exception as error:  # queue.Empty: a rank hung
            if isinstance(error, pytest.fail.Exception):
                raise
            pytest.fail(f"workers timed out after {timeout_s}s ({len(collected)} of {len(expect_ranks)} done)")
        finally:
            for proc in procs:
                proc.join(timeout=10 if proc.pid and _rank_of(procs, proc) in expect_ranks else 0)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=10)
    return [collected.get(r) for r in range(world_size)]


def _rank_of(procs, proc):
    return procs.index(proc)


def identical_across_ranks(tensor) -> bool:
    """True on every rank when ``tensor`` holds the same values on every rank (a collective)."""
    import torch
    import torch.distributed as dist

    rows = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, tensor)
    return all(torch.equal(rows[0], row) for row in rows)


def free_ports(count: int) -> list[str]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (for a store or a rendezvous per job)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [str(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()
