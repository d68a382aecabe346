"""Supernet training under Birder on real gloo processes, and the supernet main job end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_supernet import Birder
from dist_supernet.supernet import OFACNN, build_sampler, step_masks
from tests.distributed.harness import run_workers

REPO = Path(__file__).resolve().parents[2]


def _identical_across_ranks(tensor):
    rows = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, tensor)
    return all(torch.equal(rows[0], row) for row in rows)


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _supernet_step_worker(rank, world_size, sampler_cfg, steps):
    """The step the trainer runs: archs from the step, union mask, no_sync for all but the last backward."""
    torch.manual_seed(0)
    model = OFACNN(in_channels=1, image_size=8, num_classes=10)
    ddp = DDP(model, find_unused_parameters=True)
    opt = Birder(ddp, lr=0.01, weight_decay=0.1)
    sampler = build_sampler(sampler_cfg, model, seed=0)
    checks = {"one_exchange_per_step": True, "untouched_unmoved": True, "untouched_state_kept": True}
    for step in range(steps):
        archs = sampler.sample(step)
        masks = step_masks(model, archs)
        params_before = [p.detach().clone() for p in model.parameters()]
        m_before = [opt.state[p]["m"].clone() for p in model.parameters()]
        opt.set_grad_mask(masks)
        gen = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        exchanges = opt.comm_stats.num_exchanges
        for i, arch in enumerate(archs):
            model.set_active(arch)
            if i < len(archs) - 1:
                with ddp.no_sync():
                    F.cross_entropy(ddp(x), y).backward()
            else:
                F.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        checks["one_exchange_per_step"] &= opt.comm_stats.num_exchanges == exchanges + 1
        for p, before, m0 in zip(model.parameters(), params_before, m_before):
            untouched = ~masks[p]
            checks["untouched_unmoved"] &= bool(torch.equal(p.detach()[untouched], before[untouched]))
            checks["untouched_state_kept"] &= bool(torch.equal(opt.state[p]["m"][untouched], m0[untouched]))
    checks["some_slice_untouched"] = any(not bool(m.all()) for m in step_masks(model, sampler.sample(0)).values())
    checks["replicas_identical"] = _identical_across_ranks(_flat(model.parameters()))
    return checks


def test_sandwich_step_does_one_exchange_and_replicas_agree():
    sandwich = {"name": "sandwich", "num_archs": 2, "random": "uniform"}
    for rank, checks in enumerate(run_workers(_supernet_step_worker, 2, sandwich, 3, timeout_s=180)):
        checks.pop("some_slice_untouched")  # the max subnet touches everything in a sandwich
        assert all(checks.values()), (rank, checks)


def test_parameters_no_subnet_touched_do_not_move():
    without_max = {"name": "uniform", "num_archs": 2}  # never the max arch: slices stay untouched
    for rank, checks in enumerate(run_workers(_supernet_step_worker, 2, without_max, 4, timeout_s=180)):
        assert all(checks.values()), (rank, checks)


def test_supernet_main_job_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dist_supernet.train", "trainer.max_steps=6", "trainer.log_every=3", "trainer.eval_every=0",
           "trainer.checkpoint_every=0", "supernet.search.population_size=4", "supernet.search.num_generations=1",
           "supernet.bn_recalibration.num_batches=2", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run_dir / "subnets.json").read_text())
    names = [entry["name"] for entry in report["subnets"]]
    assert "max" in names and "min" in names and sum(n.startswith("searched") for n in names) >= 3, names
    for entry in report["subnets"]:
        assert {"arch", "flops", "params", "accuracy"} <= entry.keys(), entry
        assert 0.0 <= entry["accuracy"] <= 1.0
    by_name = {e["name"]: e for e in report["subnets"]}
    assert by_name["min"]["flops"] < by_name["max"]["flops"]
    assert (run_dir / "pareto.png").stat().st_size > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["params_in_sync"] is True and summary["compression"] == "birder"
    assert summary["model"] == "ofa_cnn" and summary["steps"] == 6
    for key in ("final_loss", "eval_accuracy", "world_size", "collective", "bytes_sent_total"):
        assert key in summary
