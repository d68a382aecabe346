"""Birder swapped into DDP code written the usual way (issue 10), on real gloo processes.

The habits under test are nanoGPT's: the optimizer is built from decay / no-decay param groups of
the bare model before the DDP wrap (so the groups' order differs from the module's), gradient
accumulation toggles ``require_backward_grad_sync``, ``clip_grad_norm_`` runs every step,
``GradScaler`` unscales and steps, and ``optimizer.state_dict()`` is saved on rank 0 only.
"""

import copy
import logging
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_supernet import Birder, BirderDDP
from tests.distributed.harness import identical_across_ranks, run_workers

LR_DECAY, WD_DECAY = 0.01, 0.5  # distinct per group so a wrong lr or wd shows in the decoded update
LR_NO_DECAY, WD_NO_DECAY = 0.002, 0.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.ln(torch.relu(self.fc1(x))))


def _model():
    torch.manual_seed(0)
    return Net()


def _groups(model):
    # nanoGPT's split: 2-D weights decay, the rest does not (fc1.w, fc2.w, then fc1.b, ln.w, ln.b, fc2.b).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": WD_DECAY, "lr": LR_DECAY},
            {"params": no_decay, "weight_decay": WD_NO_DECAY, "lr": LR_NO_DECAY}]


def _batch(step, rank, micro=0):
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    x = torch.randn(16, 8, generator=gen)
    return x, x[:, :4].argmax(dim=1)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])



def _decoded_mean(before, after, lr, wd):
    """ū from one step x' = x - lr·(ū + wd·x); with 2 ranks it is -1, 0 or +1 if lr and wd are the group's."""
    return (before - after) / lr - wd * before


def _train(ddp, opt, steps, rank, *, clip=None, accumulate=1, sync_style="flag", start=0):
    for step in range(start, start + steps):
        for micro in range(accumulate):
            last = micro == accumulate - 1
            x, y = _batch(step, rank, micro)
            if sync_style == "flag":
                ddp.require_backward_grad_sync = last
                F.cross_entropy(ddp(x), y).backward()
            elif last:
                F.cross_entropy(ddp(x), y).backward()
            else:
                with ddp.no_sync():
                    F.cross_entropy(ddp(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_second_state_over_the_same_parameters():
    # A fresh optimizer over a model that already had one (a notebook cell run twice, a resume that
    # rebuilds it), and attach() of groups whose order differs from the module's, both build a
    # second BirderState over the same tensors; its registry must key them by identity.
    model = _model()
    Birder(model.parameters(), lr=0.01)
    opt = Birder(_groups(model), lr=0.01)
    assert not opt.hooked


def _construction_worker(rank, world_size):
    checks = {}
    # 1. nanoGPT's order: groups from the bare model, DDP wrap, one attach line.
    model = _model()
    opt = Birder(_groups(model), lr=1.0, seed=5)
    ddp = DDP(model, bucket_cap_mb=0.001)  # ~250 floats per bucket: several buckets
    opt.attach(ddp)
    # .grad after backward holds this rank's own gradient, not the average.
    local = copy.deepcopy(model)
    x, y = _batch(0, rank)
    F.cross_entropy(ddp(x), y).backward()
    F.cross_entropy(local(x), y).backward()
    checks["grad_is_local"] = all(torch.allclose(p.grad, q.grad, atol=1e-6)
                                  for p, q in zip(model.parameters(), local.parameters()))
    checks["grad_differs_across_ranks"] = not identical_across_ranks(torch.cat([p.grad.reshape(-1)
                                                                              for p in model.parameters()]))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    # Each group's own lr and weight decay: the decoded ū is in {-1, 0, 1} with the group's values.
    worst = 0.0
    for name, p in model.named_parameters():
        lr, wd = (LR_DECAY, WD_DECAY) if p.dim() >= 2 else (LR_NO_DECAY, WD_NO_DECAY)
        mean = _decoded_mean(before[name], p.detach(), lr, wd)
        worst = max(worst, float((mean - mean.round().clamp(-1, 1)).abs().max()))
    checks["group_lr_wd_worst_error"] = worst
    _train(ddp, opt, 4, rank, start=1)
    stats = opt.comm_stats.snapshot()
    checks["attach"] = dict(hooked=opt.hooked, steps=opt.num_steps, bytes=stats["bytes_total"],
                            exchanges=stats["num_exchanges"], in_sync=identical_across_ranks(_flat(model)))
    reference = _flat(model)

    # 2. The same run through the other construction paths: bit-identical parameters.
    paths = {}
    for path in ("Birder(ddp_model)", "BirderDDP then Birder(groups)", "Birder(groups) then BirderDDP"):
        model = _model()
        if path == "Birder(ddp_model)":
            ddp = DDP(model, bucket_cap_mb=0.001)
            opt = Birder(ddp, lr=1.0, seed=5)
            for group in opt.param_groups:  # one group: give it decay's values, compare below
                group.update(lr=LR_DECAY, weight_decay=WD_DECAY)
        elif path == "BirderDDP then Birder(groups)":
            ddp = BirderDDP(model, seed=5, bucket_cap_mb=0.001)
            opt = Birder(_groups(model), lr=1.0, seed=5)
        else:
            opt = Birder(_groups(model), lr=1.0, seed=5)
            ddp = BirderDDP(model, bucket_cap_mb=0.001)
        _train(ddp, opt, 5, rank)
        stats = opt.comm_stats.snapshot()
        paths[path] = dict(hooked=opt.hooked, steps=opt.num_steps, bytes=stats["bytes_total"],
                           in_sync=identical_across_ranks(_flat(model)),
                           same_as_attach=torch.equal(_flat(model), reference))
    checks["paths"] = paths

    # 3. No hook in a 2-rank job: one warning line with the fix, on the first step only.
    records = _Records()
    logger = logging.getLogger("dist_supernet.optim.birder")
    logger.addHandler(records)
    model = _model()
    opt = Birder(_groups(model), lr=0.01)
    ddp = DDP(model)  # attach forgotten
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(ddp, opt, 3, rank)
    checks["unhooked_log_lines"] = records.lines
    checks["unhooked_warnings"] = [str(w.message) for w in caught if "hook" in str(w.message)]
    records.lines = []
    model = _model()
    opt = Birder(_groups(model), lr=0.01, collective=None)  # local mode on purpose: no warning
    ddp = DDP(model)
    _train(ddp, opt, 2, rank)
    checks["local_on_purpose_log_lines"] = records.lines
    logger.removeHandler(records)
    return checks


def test_birder_built_before_ddp_groups_and_every_construction_path():
    for rank, checks in enumerate(run_workers(_construction_worker, 2, timeout_s=240)):
        assert checks["grad_is_local"], rank
        assert checks["grad_differs_across_ranks"], rank
        assert checks["group_lr_wd_worst_error"] < 1e-3, (rank, checks["group_lr_wd_worst_error"])
        attach = checks["attach"]
        assert attach["hooked"] and attach["steps"] == 5 and attach["exchanges"] == 5, attach
        assert attach["bytes"] > 0 and attach["in_sync"], attach
        for path, result in checks["paths"].items():
            assert result["hooked"] and result["steps"] == 5 and result["bytes"] > 0, (path, result)
            assert result["in_sync"], (path, result)
            if path != "Birder(ddp_model)":  # same groups, same seed: the same bits, the same x
                assert result["same_as_attach"], (path, result)
        assert len(checks["unhooked_log_lines"]) == 1, checks["unhooked_log_lines"]
        line = checks["unhooked_log_lines"][0]
        assert "2 ranks" in line and "opt.attach(ddp_model)" in line, line
        assert len(checks["unhooked_warnings"]) == 1, checks["unhooked_warnings"]
        assert checks["local_on_purpose_log_lines"] == [], checks["local_on_purpose_log_lines"]


def _habits_worker(rank, world_size):
    checks = {}
    # 1. Clipping and unscaling cannot change Birder's update: same seed, with and without, same x.
    finals = {}
    for clip in (None, 1e-3):
        model = _model()
        opt = Birder(_groups(model), lr=1.0, seed=1)
        ddp = opt.attach(DDP(model, bucket_cap_mb=0.001))
        _train(ddp, opt, 6, rank, clip=clip)
        finals[clip] = _flat(model)
    checks["clip_same_params"] = torch.equal(finals[None], finals[1e-3])

    # 2. Accumulation: require_backward_grad_sync toggled = one exchange per step, same x as no_sync().
    results = {}
    for style in ("flag", "no_sync"):
        model = _model()
        opt = Birder(_groups(model), lr=1.0, seed=2)
        ddp = opt.attach(DDP(model, bucket_cap_mb=0.001))
        _train(ddp, opt, 4, rank, accumulate=3, sync_style=style)
        results[style] = (_flat(model), opt.comm_stats.snapshot()["num_exchanges"], opt.num_steps)
    checks["accum_exchanges"] = results["flag"][1]
    checks["accum_steps"] = results["flag"][2]
    checks["accum_same_as_no_sync"] = torch.equal(results["flag"][0], results["no_sync"][0])

    # 3. GradScaler on CPU with fp16 autocast; rank 1 overflows at step 2: every rank skips, same scales.
    model = _model()
    opt = Birder(_groups(model), lr=1.0, seed=3)
    ddp = opt.attach(DDP(model, bucket_cap_mb=0.001))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scales, moved, grad_finite = [], [], []
    for step in range(5):
        x, y = _batch(step, rank)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(ddp(x).float(), y)
        if step == 2 and rank == 1:
            loss = loss * float("inf")
        before = _flat(model)
        scaler.scale(loss).backward()
        grad_finite.append(all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()))
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        scales.append(scaler.get_scale())
        moved.append(not torch.equal(before, _flat(model)))
    checks["scaler"] = dict(scales=scales, moved=moved, grad_finite=grad_finite, steps=opt.num_steps,
                            in_sync=identical_across_ranks(_flat(model)))
    scales_tensor = torch.tensor(scales)
    checks["scaler"]["scales_equal"] = identical_across_ranks(scales_tensor)
    return checks


def test_clipping_accumulation_and_grad_scaler_overflow_on_one_rank():
    for rank, checks in enumerate(run_workers(_habits_worker, 2, timeout_s=240)):
        assert checks["clip_same_params"], rank
        assert checks["accum_exchanges"] == 4 and checks["accum_steps"] == 4, checks
        assert checks["accum_same_as_no_sync"], rank
        scaler = checks["scaler"]
        # Step 2: rank 1's loss is inf, rank 0's .grad gets a NaN from the hook, both skip and back off.
        assert scaler["grad_finite"] == [True, True, False, True, True], (rank, scaler)
        assert scaler["moved"] == [True, True, False, True, True], (rank, scaler)
        assert scaler["scales"][2] == scaler["scales"][1] / 2, (rank, scaler)
        assert scaler["scales_equal"] and scaler["in_sync"], (rank, scaler)
        assert scaler["steps"] == 4, (rank, scaler)


def _checkpoint_worker(rank, world_size, path):
    import dist_supernet.optim.birder as birder_module

    checks = {}
    model = _model()
    opt = Birder(_groups(model), lr=0.01, seed=4)
    ddp = opt.attach(DDP(model, bucket_cap_mb=0.001))
    _train(ddp, opt, 3, rank)
    # rank 0 saves its own state_dict, as nanoGPT does: collective-free, so rank 1 does not wait.
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    dist.barrier()
    ckpt = torch.load(path, weights_only=False)
    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = Birder(_groups(resumed), lr=0.01, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt2.load_state_dict(ckpt["optimizer"])
    checks["load_warnings"] = [str(w.message) for w in caught if "Birder" in str(w.message)]
    ddp2 = opt2.attach(DDP(resumed, bucket_cap_mb=0.001))
    rank0_m = torch.cat([ckpt["optimizer"]["state"][i]["m"].reshape(-1) for i in sorted(ckpt["optimizer"]["state"])])
    mine_m = torch.cat([opt2.state[p]["m"].reshape(-1) for g in opt2.param_groups for p in g["params"]])
    checks["resumed_with_rank0_m"] = torch.equal(rank0_m, mine_m)
    checks["resumed_step"] = opt2.num_steps
    _train(ddp2, opt2, 2, rank)
    checks["resumed_in_sync"] = identical_across_ranks(_flat(resumed))

    # consolidate_state_dict() inside an `if rank == 0:` block: raises in seconds instead of hanging.
    birder_module._CONSOLIDATE_TIMEOUT_S = 2.0
    start = time.monotonic()
    if rank == 0:
        try:
            opt2.consolidate_state_dict(to=0)
            checks["one_rank_consolidate"] = "returned"
        except RuntimeError as error:
            checks["one_rank_consolidate"] = str(error)
    checks["one_rank_consolidate_s"] = time.monotonic() - start
    dist.barrier()
    return checks


def test_rank0_only_checkpoint_and_one_rank_consolidate(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    results = run_workers(_checkpoint_worker, 2, path, timeout_s=240)
    for rank, checks in enumerate(results):
        assert checks["resumed_with_rank0_m"] and checks["resumed_step"] == 3, (rank, checks)
        assert checks["resumed_in_sync"], rank
        if rank == 0:  # its own state: exact, no warning
            assert checks["load_warnings"] == [], checks["load_warnings"]
            message = checks["one_rank_consolidate"]
            assert "call it on every rank" in message and "[0]" in message, message
            assert checks["one_rank_consolidate_s"] < 15, checks["one_rank_consolidate_s"]
        else:
            assert len(checks["load_warnings"]) == 1 and "rank 0 of 2" in checks["load_warnings"][0], checks


def _consolidate_worker(rank, world_size):
    import dist_supernet.optim.birder as birder_module

    birder_module._CONSOLIDATE_TIMEOUT_S = 2.0
    checks = {}
    model = _model()
    opt = Birder(_groups(model), lr=0.01, seed=6)
    ddp = opt.attach(DDP(model, bucket_cap_mb=0.001))
    _train(ddp, opt, 2, rank)
    opt.consolidate_state_dict(to=0)  # on every rank: rank 0's state_dict holds every rank's m, b
    saved = opt.state_dict()
    checks["per_rank_shape"] = None if saved["birder"]["per_rank"] is None else tuple(saved["birder"]["per_rank"].shape)
    # Rank 0's file, loaded on every rank into a fresh Birder built from the same groups (whose order is
    # not the module's), before the attach (the Hugging Face Trainer loads, then its callback attaches)
    # and after it: each rank gets its own m, b back, parameter by parameter.
    shared = [saved if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    own_m = [opt.state[p]["m"].clone() for p in model.parameters()]
    own_b = [opt.state[p]["b"].clone() for p in model.parameters()]
    for when in ("before_attach", "after_attach"):
        fresh = _model()
        fresh_opt = Birder(_groups(fresh), lr=0.01, seed=6)
        if when == "after_attach":
            fresh_opt.attach(DDP(fresh, bucket_cap_mb=0.001))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every rank's own state: no fallback warning
            fresh_opt.load_state_dict(shared[0])
        if when == "before_attach":
            fresh_opt.attach(DDP(fresh, bucket_cap_mb=0.001))
        checks[f"own_state_{when}"] = all(
            torch.equal(fresh_opt.state[p]["m"], m) and torch.equal(fresh_opt.state[p]["b"], b)
            for p, m, b in zip(fresh.parameters(), own_m, own_b))
    # A consolidation that no save followed (a step ran since) is stale: state_dict() leaves it out.
    opt.consolidate_state_dict(to=0)
    _train(ddp, opt, 1, rank, start=2)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        checks["stale_per_rank"] = opt.state_dict()["birder"]["per_rank"] is not None
    if rank == 0:  # the mistake: inside the rank-0 save block
        try:
            opt.consolidate_state_dict(to=0)
        except RuntimeError:
            pass
    dist.barrier()
    # Told to call it on every rank, the script does: this must work (or fail on every rank alike).
    try:
        opt.consolidate_state_dict(to=0)
        retry = opt.state_dict()["birder"]["per_rank"]
        checks["retry"] = "ok" if (rank != 0 or (retry is not None and retry.shape[0] == 2)) else "no per_rank"
    except Exception as error:  # noqa: BLE001 (reported to the test)
        checks["retry"] = f"{type(error).__name__}: {str(error)[:200]}"
    return checks


def test_consolidate_on_every_rank_works_after_a_one_rank_call():
    # A short process-group timeout: a rank stuck in the gather fails in seconds, not 30 minutes.
    results = run_workers(_consolidate_worker, 2, timeout_s=120, env={"TEST_PG_TIMEOUT_S": "15"})
    assert results[0]["per_rank_shape"][:2] == (2, 2), results[0]
    for rank, checks in enumerate(results):
        assert checks["retry"] == "ok", (rank, checks["retry"])
        assert checks["own_state_before_attach"] and checks["own_state_after_attach"], (rank, checks)
        assert not checks["stale_per_rank"], (rank, checks)
