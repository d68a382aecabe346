"""Checkpoints on real gloo processes: each rank writes its own m, b; exact resume; async save; 2 -> 4 and 2 -> 1.

Three spawns (2, 4 and 1 processes), a 3-layer MLP with Birder's 1-bit hook,
a few steps each. What the training app does with the same manager
(torchrun restarts, the recipe check, the one warning line) is in
test_train_app.py and test_faults.py.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_supernet.train.checkpoint import (
    BirderRankState,
    CheckpointManager,
    ModelState,
    RNGState,
    StatefulGroup,
    rank_key,
    read_checkpoint,
)
from dist_supernet.train.untrusted import load_dcp_metadata
from tests.distributed.harness import run_workers


def _build(seed: int = 0):
    """``seed``: the initial weights (a resume overwrites them)."""
    from dist_supernet.optim import Birder

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    ddp = DistributedDataParallel(model)
    return model, ddp, Birder(ddp, lr=0.01, seed=0)  # the draws' seed is config (trainer.seed), not state


def _train(ddp, opt, steps, first_step: int) -> None:
    for step in range(first_step, first_step + steps):
        g = torch.Generator().manual_seed(1000 * step + dist.get_rank())  # this rank's batch of this step
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _components(model, opt, step):
    replicated = {"model": ModelState(model), "progress": {"step": step}}
    return replicated, {"optimizer": BirderRankState(opt), "rng": RNGState(), "comm_stats": opt.comm_stats}


def _snapshot(model, opt) -> dict:
    state = opt.rank_state()
    return {"x": {n: p.detach().clone() for n, p in model.named_parameters()}, "m": state["m"].clone(),
            "b": state["b"].clone()}


def _plain(snapshot: dict) -> dict:
    """Lists, not tensors: a tensor put on the result queue is shared memory of a process that is exiting."""
    return {"x": {n: t.tolist() for n, t in snapshot["x"].items()}, "m": snapshot["m"].tolist(),
            "b": snapshot["b"].tolist()}


def _tensors(snapshot: dict) -> dict:
    return {"x": {n: torch.tensor(v) for n, v in snapshot["x"].items()}, "m": torch.tensor(snapshot["m"]),
            "b": torch.tensor(snapshot["b"])}


def _same(a: dict, b: dict) -> bool:
    return (a["x"].keys() == b["x"].keys() and all(torch.equal(a["x"][n], b["x"][n]) for n in a["x"])
            and torch.equal(a["m"], b["m"]) and torch.equal(a["b"], b["b"]))


def _save_resume_async_worker(rank, world_size, directory):
    model, ddp, opt = _build()
    _train(ddp, opt, 3, first_step=1)
    ckpts = CheckpointManager(f"{directory}/sync", keep=2)
    path = ckpts.save(*_components(model, opt, 3), step=3)
    at_3 = _snapshot(model, opt)
    draws_after_save = torch.rand(3)
    _train(ddp, opt, 3, first_step=4)
    at_6 = _snapshot(model, opt)

    # Asynchronous: the state is staged at the call; training goes on while it is written.
    async_ckpts = CheckpointManager(f"{directory}/async", keep=2, async_save=True)
    async_ckpts.save(*_components(model, opt, 6), step=6, blocking=False)
    _train(ddp, opt, 1, first_step=7)  # mutates x, m, b during the background write
    async_ckpts.wait()

    # Resume from step 3 in fresh objects (other init): the same steps give the same x, m, b.
    model2, ddp2, opt2 = _build(seed=5)
    found = ckpts.find_latest()
    replicated, per_rank = _components(model2, opt2, 0)
    ckpts.load(found, {**replicated, rank_key(rank): StatefulGroup(per_rank)})
    resumed = _snapshot(model2, opt2)
    rng_restored = torch.equal(torch.rand(3), draws_after_save)
    _train(ddp2, opt2, 3, first_step=4)
    return {"path": str(path), "at_3": _plain(at_3), "at_6": _plain(at_6), "resumed_equal": _same(resumed, at_3),
            "replayed_equal": _same(_snapshot(model2, opt2), at_6), "rng_restored": rng_restored,
            "step": replicated["progress"]["step"]}


def _mean_worker(rank, world_size, path):
    from pathlib import Path

    model, ddp, opt = _build(seed=7)
    ckpts = CheckpointManager(Path(path).parent, keep=2)
    found = ckpts.open(Path(path))
    ckpts.load(found, {"model": ModelState(model)})
    mean = ckpts.load_mean(found, ("optimizer",), like=opt.rank_state())
    opt.load_rank_state(mean)
    return {**_plain(_snapshot(model, opt)), "saved_world": found.world_size}


def test_each_rank_writes_its_own_state_resumes_exactly_and_async_saves_what_it_was_given(tmp_path):
    results = run_workers(_save_resume_async_worker, 2, str(tmp_path))
    for r in results:
        r["at_3"], r["at_6"] = _tensors(r["at_3"]), _tensors(r["at_6"])
    for r in results:
        assert r["resumed_equal"] and r["replayed_equal"] and r["rng_restored"] and r["step"] == 3
    path = tmp_path / "sync" / "step_00000003"
    state = read_checkpoint(path)
    for rank, r in enumerate(results):
        saved = state[rank_key(rank)]["optimizer"]
        assert torch.equal(saved["m"], r["at_3"]["m"]) and torch.equal(saved["b"], r["at_3"]["b"])
    assert not torch.equal(results[0]["at_3"]["m"], results[1]["at_3"]["m"])  # per-rank state, really
    # Each rank's m, b in its own file; the replicated model once in all (DCP spreads it over the ranks).
    where = {i.fqn: s.relative_path for i, s in load_dcp_metadata(path / ".metadata").storage_data.items()}
    for rank in (0, 1):
        assert {where[f"{rank_key(rank)}.optimizer.{k}"] for k in ("m", "b")} == {f"__{rank}_0.distcp"}
    assert sorted(k for k in where if k.startswith("model.")) == sorted(f"model.{n}" for n in state["model"])
    # The async checkpoint holds step 6 as it was at the call, not the state the next step made.
    async_state = read_checkpoint(tmp_path / "async" / "step_00000006")
    for rank, r in enumerate(results):
        assert torch.equal(async_state[rank_key(rank)]["optimizer"]["m"], r["at_6"]["m"])
    assert all(torch.equal(async_state["model"][n], x) for n, x in results[0]["at_6"]["x"].items())

    # The documented fallback on another world size: every rank starts from the mean of the
    # saved ranks' m, b (new rank k reads saved rows r = k mod world, one all-reduce).
    expected_m = (state["rank00000"]["optimizer"]["m"] + state["rank00001"]["optimizer"]["m"]) / 2
    expected_b = (state["rank00000"]["optimizer"]["b"] + state["rank00001"]["optimizer"]["b"]) / 2
    for new_world in (4, 1):
        loaded = run_workers(_mean_worker, new_world, str(path))
        assert all(r["saved_world"] == 2 for r in loaded)
        for r in map(_tensors, loaded):
            assert torch.equal(r["m"], expected_m) and torch.equal(r["b"], expected_b)
            assert all(torch.equal(r["x"][n], x) for n, x in results[0]["at_3"]["x"].items())
            assert bool((r["m"].abs() <= r["b"]).all())  # |mean m| <= mean b: r = m / b stays in [-1, 1]
