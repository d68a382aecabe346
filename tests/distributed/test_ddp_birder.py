"""Birder inside DDP on real gloo processes: replicas, no-gradient rule, bucket rebuild, no_sync, resume."""

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_supernet import Birder
from tests.distributed.harness import identical_across_ranks, run_workers

BETA = 0.9


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.frozen = nn.Linear(8, 32)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(32, 32)  # never called: no rank ever has a gradient
        self.branch = nn.Linear(32, 32)  # called on rank 0 only, every other step
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x, use_branch=False):
        h = torch.relu(self.fc1(x) + self.frozen(x))
        if use_branch:
            h = h + self.branch(h)
        return self.fc2(h)


def _batch(step, rank, micro=0):
    gen = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    x = torch.randn(16, 8, generator=gen)
    return x, (x[:, :4].argmax(dim=1))


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])



# The second-moment rule with per-rank clipping: b = EMA of g^2 (BETA2), each rank's gradient scaled to norm CLIP.
BETA2, CLIP = 0.99, 1.0
RMS_CLIP = dict(normalizer="rms", beta2=BETA2, grad_clip=CLIP)


def _make(collective, requantize=False, num_nodes=None, rule=None, **ddp_kwargs):
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.004, **ddp_kwargs)  # ~1k floats per bucket: several buckets
    opt = Birder(ddp, lr=0.01, beta=BETA, weight_decay=0.1, collective=collective,
                 requantize=requantize, num_nodes=num_nodes, seed=3, **(rule or {}))
    return model, ddp, opt


def _train_worker(rank, world_size):
    checks = {}
    for collective, requantize, num_nodes, rule in [
        ("allgather", False, None, None),
        ("two_phase", False, None, None),
        ("two_phase", True, None, None),
        ("hierarchical", False, 2, None),
        ("two_phase", False, None, RMS_CLIP),  # the chunks wait for the last bucket: the norm needs them all
    ]:
        tag = f"{collective}{'+requantize' if requantize else ''}{'+rms+clip' if rule else ''}"
        model, ddp, opt = _make(collective, requantize, num_nodes, rule, find_unused_parameters=True)
        clipped_steps = 0
        reference = copy.deepcopy(model)  # plain replica to recompute this rank's m, b
        m_ref = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
        b_ref = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
        frozen0 = model.frozen.weight.detach().clone()
        unused0 = model.unused.weight.detach().clone()
        losses = []
        for step in range(20):
            x, y = _batch(step, rank)
            use_branch = rank == 0 and step % 2 == 0
            # This rank's m, b by hand: local gradient, update where any rank had a gradient.
            reference.load_state_dict(model.state_dict())
            reference.zero_grad()
            F.cross_entropy(reference(x, use_branch), y).backward()
            scale = 1.0
            if rule:  # this rank's own gradient norm (what the DDP buckets hold: unused parameters are 0)
                norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in reference.parameters()
                                            if p.grad is not None)))
                scale = min(1.0, CLIP / norm)
                clipped_steps += scale < 1.0
            for name, p in reference.named_parameters():
                got_grad_somewhere = not name.startswith(("frozen", "unused")) and (
                    not name.startswith("branch") or step % 2 == 0
                )
                if got_grad_somewhere:
                    g = (p.grad if p.grad is not None else torch.zeros_like(p)) * scale
                    m_ref[name].mul_(BETA).add_(g, alpha=1 - BETA)
                    if rule:
                        b_ref[name].mul_(BETA2).add_(g * g, alpha=1 - BETA2)
                    else:
                        b_ref[name].mul_(BETA).add_(g.abs(), alpha=1 - BETA)
            loss = F.cross_entropy(ddp(x, use_branch), y)
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        checks[f"{tag}/replicas_identical"] = identical_across_ranks(_flat(model))
        checks[f"{tag}/frozen_unmoved"] = torch.equal(model.frozen.weight, frozen0)
        checks[f"{tag}/unused_unmoved"] = torch.equal(model.unused.weight, unused0)
        checks[f"{tag}/unused_state_zero"] = bool(opt.state[model.unused.weight]["m"].eq(0).all())
        checks[f"{tag}/one_exchange_per_step"] = opt.comm_stats.num_exchanges == 20
        checks[f"{tag}/loss_down"] = sum(losses[-5:]) < sum(losses[:5])
        state_ok = True
        for name, p in model.named_parameters():
            if name.startswith("frozen"):
                continue
            st = opt.state[p]
            state_ok &= torch.allclose(st["m"], m_ref[name], atol=1e-6, rtol=1e-5)
            state_ok &= torch.allclose(st["b"], b_ref[name], atol=1e-6, rtol=1e-5)
        checks[f"{tag}/state_survives_bucket_rebuild"] = bool(state_ok)
        if rule:
            checks[f"{tag}/clipped_some_steps_not_all"] = 0 < clipped_steps < 20
    # no_sync: 3 micro-batches, one exchange per optimizer step.
    model, ddp, opt = _make("two_phase", find_unused_parameters=True)
    for step in range(4):
        for micro in range(3):
            x, y = _batch(step, rank, micro)
            if micro < 2:
                with ddp.no_sync():
                    F.cross_entropy(ddp(x), y).backward()
            else:
                F.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    checks["no_sync/one_exchange_per_step"] = opt.comm_stats.num_exchanges == 4
    checks["no_sync/replicas_identical"] = identical_across_ranks(_flat(model))
    # Buckets compressed and sent in pieces (split inside parameters, 8-element aligned) give the whole
    # bucket's result bit for bit: parameters and this rank's m, b equal, replicas identical.
    for collective, requantize, num_nodes in [("allgather", False, None), ("two_phase", True, None),
                                              ("hierarchical", False, 2)]:
        finals = {}
        for piece_numel in (None, 64):
            model, ddp, opt = _make(collective, requantize, num_nodes, find_unused_parameters=True)
            if piece_numel is not None:
                opt.hook_state.piece_numel = piece_numel
            for step in range(6):
                x, y = _batch(step, rank)
                opt.zero_grad()
                F.cross_entropy(ddp(x, rank == 0 and step % 2 == 0), y).backward()
                opt.step()
            finals[piece_numel] = (_flat(model), opt.rank_state()["m"], opt.rank_state()["b"])
            if piece_numel is None:  # sized by the link: every rank agreed on the same next piece size
                agreed = torch.tensor([opt.hook_state.piece_log2])
                checks[f"pieces/{collective}/size_agreed"] = identical_across_ranks(agreed) and 16 <= int(agreed) <= 24
        tag = f"pieces/{collective}{'+requantize' if requantize else ''}"
        checks[f"{tag}/same_as_whole_buckets"] = all(torch.equal(a, b) for a, b in zip(finals[None], finals[64]))
        checks[f"{tag}/replicas_identical"] = identical_across_ranks(finals[64][0])
    # A NaN on rank 1 only: every rank skips that step with x unchanged; NaN/Inf elements never enter
    # m, b (rank 1's gradient is all NaN: its m, b stay), finite ones do (rank 0's m, b take the step).
    # Buckets go in pieces of 64 elements here: the non-finite flag is raised by any piece.
    model, ddp, opt = _make("two_phase", find_unused_parameters=True)
    opt.hook_state.piece_numel = 64
    _run_steps(ddp, opt, rank, range(3))
    params_before = _flat(model).clone()
    state_before = {k: opt.rank_state()[k].clone() for k in "mb"}
    x, y = _batch(3, rank)
    if rank == 1:
        x[0, 0] = float("nan")
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()
    grads_nonfinite = not bool(torch.isfinite(torch.cat([p.grad.reshape(-1) for p in model.parameters()
                                                          if p.grad is not None])).all())
    opt.step()
    checks["nan/params_unchanged"] = torch.equal(_flat(model), params_before)
    checks["nan/grad_nonfinite_on_every_rank"] = grads_nonfinite  # what GradScaler's inf check reads
    for k in "mb":
        now = opt.rank_state()[k]
        checks[f"nan/{k}_finite"] = bool(torch.isfinite(now).all())
        checks[f"nan/{k}_unchanged_where_nonfinite"] = torch.equal(now, state_before[k]) == (rank == 1)
    checks["nan/counted"] = opt.skipped_steps == 1 and opt.consecutive_skips == 1
    checks["nan/ranks_named"] = opt.last_skip["ranks"] == [1] and opt.last_skip["step"] == 3
    checks["nan/first_param_is_fc1"] = opt.last_skip["param_index"] == 0  # the same name on every rank
    _run_steps(ddp, opt, rank, range(4, 6))
    checks["nan/trains_on"] = opt.consecutive_skips == 0 and not torch.equal(_flat(model), params_before)
    checks["nan/replicas_identical"] = identical_across_ranks(_flat(model))
    return checks


def test_birder_ddp_training():
    results = run_workers(_train_worker, 2, timeout_s=240)
    for rank, checks in enumerate(results):
        failed = [name for name, ok in checks.items() if not ok]
        assert not failed, f"rank {rank}: {failed}"


def _run_steps(ddp, opt, rank, steps):
    for step in steps:
        x, y = _batch(step, rank)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()


def _resume_worker(rank, world_size, checkpoint_path):
    ddp_kwargs = dict(gradient_as_bucket_view=True, static_graph=True)
    # Uninterrupted: 20 steps.
    model, ddp, opt = _make("two_phase", requantize=True, **ddp_kwargs)
    _run_steps(ddp, opt, rank, range(20))
    uninterrupted = _flat(model)
    # Interrupted: 10 steps, checkpoint, fresh objects (fresh DDP buckets), load, 10 more.
    model, ddp, opt = _make("two_phase", requantize=True, **ddp_kwargs)
    _run_steps(ddp, opt, rank, range(10))
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_path)
    else:
        opt.state_dict()
    dist.barrier()
    model, ddp, opt = _make("two_phase", requantize=True, **ddp_kwargs)
    saved = torch.load(checkpoint_path, weights_only=True)
    model.load_state_dict(saved["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same world size: no fallback warning
        opt.load_state_dict(saved["optim"])
    resumed_step = opt.num_steps
    _run_steps(ddp, opt, rank, range(10, 20))
    return {
        "bit_identical": torch.equal(_flat(model), uninterrupted),
        "step": resumed_step,
        "replicas_identical": identical_across_ranks(_flat(model)),
    }


def test_resume_is_bit_identical_and_other_world_size_falls_back(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    results = run_workers(_resume_worker, 2, path, timeout_s=240)
    for rank, checks in enumerate(results):
        assert checks == {"bit_identical": True, "step": 10, "replicas_identical": True}, rank
    # World size 1 (a single local process) resumes from the 2-rank checkpoint: mean of the ranks.
    saved = torch.load(path, weights_only=True)
    per_rank = saved["optim"]["birder"]["per_rank"]
    assert per_rank.shape[:2] == (2, 2)
    torch.manual_seed(0)
    model = Net()
    model.load_state_dict(saved["model"])
    opt = Birder(model.parameters(), lr=0.01, beta=BETA)
    with pytest.warns(UserWarning, match="checkpoint holds m, b of 2 ranks"):
        opt.load_state_dict(saved["optim"])
    expected_m = per_rank[:, 0].mean(dim=0)
    got_m = torch.cat([opt.state[p]["m"].reshape(-1) for p in model.parameters()])
    assert torch.equal(got_m, expected_m)
    assert opt.num_steps == 10
    x, y = _batch(0, 0)
    F.cross_entropy(model(x), y).backward()
    opt.step()  # and it trains on
    assert opt.num_steps == 11


def _powersgd_worker(rank, world_size):
    from dist_supernet.comm import register_baseline_hook

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    ddp = DDP(model, bucket_cap_mb=0.02)  # ~5k floats per bucket: several buckets
    stats = register_baseline_hook(ddp, "powersgd", rank=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(6):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step * 10 + rank))
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
    return {"replicas_identical": identical_across_ranks(_flat(model)), "exchanges": stats.num_exchanges}


def test_powersgd_baseline_with_several_buckets_on_gloo():
    for rank, result in enumerate(run_workers(_powersgd_worker, 2, timeout_s=120)):
        assert result == {"replicas_identical": True, "exchanges": 6}, rank
