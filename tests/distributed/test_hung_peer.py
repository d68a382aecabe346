"""A stopped peer makes the 1-bit exchange fail within the configured timeout, naming stage and rank."""

import os
import signal
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_supernet import Birder
from tests.distributed.harness import run_workers

TIMEOUT_S = 3.0


def _stopped_peer_worker(rank, world_size, collective, num_nodes):
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    ddp = DDP(model)
    opt = Birder(ddp, lr=0.01, collective=collective, num_nodes=num_nodes, timeout_s=TIMEOUT_S)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    for step in range(3):
        if step == 2 and rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)  # a hung peer: alive, silent
        started = time.monotonic()
        try:
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        except Exception as error:  # what the user sees
            return {"step": step, "message": str(error), "seconds": time.monotonic() - started}
    return {"step": None}


def _check(result, stage, where):
    assert result["step"] == 2, result
    assert f"stage '{stage}' ({where}) on rank 0 of 2" in result["message"], result["message"]
    print(f"hung peer reported after {result['seconds']:.2f}s: {result['message'][:160]}")
    assert result["seconds"] < TIMEOUT_S + 10, result


def test_stopped_peer_times_out_in_flat_collective():
    result = run_workers(_stopped_peer_worker, 2, "two_phase", None, expect_ranks=[0], timeout_s=120)[0]
    _check(result, "all-to-all chunks", "world")


def test_stopped_peer_times_out_between_nodes():
    result = run_workers(_stopped_peer_worker, 2, "hierarchical", 2, expect_ranks=[0], timeout_s=120)[0]
    _check(result, "all-gather node bits", "inter-node")
