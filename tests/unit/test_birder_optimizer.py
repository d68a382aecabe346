"""Birder's algorithmic properties in one process (local mode)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_supernet import kernels
from dist_supernet import Birder
from dist_supernet.comm import Topology, mix_seed


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(32, 6, generator=gen)
    return x, x[:, :3].argmax(dim=1)


def _train(model, opt, steps, loss_scale=1.0):
    for step in range(steps):
        x, y = _data(step)
        opt.zero_grad()
        (F.cross_entropy(model(x), y) * loss_scale).backward()
        opt.step()


def test_loss_scale_does_not_change_the_trajectory():
    # r = m / b is scale invariant, so the same bits are drawn (up to fp rounding of m/b;
    # powers of two scale exactly).
    a, b = _model(), _model()
    _train(a, Birder(a.parameters(), lr=0.01), 10)
    _train(b, Birder(b.parameters(), lr=0.01), 10, loss_scale=1024.0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_every_coordinate_moves_at_most_lr():
    model = _model()
    opt = Birder(model.parameters(), lr=0.05)
    for step in range(5):
        before = [p.detach().clone() for p in model.parameters()]
        x, y = _data(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for p, q in zip(model.parameters(), before):
            assert (p - q).abs().max() <= 0.05 * (1 + 1e-6)


def test_descends_and_is_reproducible():
    a, b = _model(), _model()
    opt_a, opt_b = Birder(a.parameters(), lr=0.01, seed=5), Birder(b.parameters(), lr=0.01, seed=5)
    x, y = _data(0)
    first = F.cross_entropy(a(x), y).item()
    _train(a, opt_a, 60)
    _train(b, opt_b, 60)
    assert F.cross_entropy(a(x), y).item() < first
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_step_is_the_reference_algorithm():
    # One step by hand: m, b, r, the shared draw, x -= lr (u + wd x).
    model = _model()
    params = list(model.parameters())
    opt = Birder(params, lr=0.1, beta=0.5, weight_decay=0.01, seed=9)
    x, y = _data(0)
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    opt.step()
    offset = 0
    seed = mix_seed(9, -1, 0, 0)
    for p, x0, g in zip(params, before, grads):
        index = torch.arange(offset, offset + p.numel(), dtype=torch.int32)
        m, b = 0.5 * g.reshape(-1), 0.5 * g.abs().reshape(-1)
        r = torch.where(b > 0, m / b, torch.zeros_like(m))
        u = torch.where(kernels.uniform(index, seed) < (r + 1) * 0.5, 1.0, -1.0).view_as(p)
        assert torch.allclose(p, x0 - 0.1 * (u + 0.01 * x0), atol=1e-7)
        offset += p.numel()


def test_lr_scheduler_and_param_groups():
    model = _model()
    opt = Birder([
        {"params": model[0].parameters(), "lr": 0.1},
        {"params": model[2].parameters(), "weight_decay": 0.5},
    ], lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.005)


def test_lr_wd_table_is_built_again_only_when_a_value_changes():
    # The table goes to the device by a copy: cached while lr and weight decay stay, rebuilt (with
    # the new values in it, and in each chunk's lr_P / wd_P) when a scheduler or a user changes them.
    model = _model()
    opt = Birder([{"params": model[0].parameters()}, {"params": model[2].parameters(), "weight_decay": 0.5}],
                 lr=0.01)
    _train(model, opt, 2)
    table = opt._lr_wd_table()
    assert opt._lr_wd_table() is table
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched.step()
    scheduled = opt._lr_wd_table()
    assert scheduled is not table and scheduled[:, 0].tolist() == pytest.approx([0.005, 0.005, 0.0])
    opt.param_groups[1]["weight_decay"] = 0.25
    assert opt._lr_wd_table()[:, 1].tolist() == pytest.approx([0.0, 0.25, 0.0])
    # the step applies the values now in the groups: same parameters as a fresh optimizer's step
    fresh_model = _model()
    fresh_model.load_state_dict(model.state_dict())
    fresh = Birder([{"params": fresh_model[0].parameters(), "lr": 0.005},
                    {"params": fresh_model[2].parameters(), "lr": 0.005, "weight_decay": 0.25}], lr=0.01)
    fresh.load_rank_state(opt.rank_state())
    fresh.hook_state.step = opt.hook_state.step
    for o, m in ((opt, model), (fresh, fresh_model)):
        x, y = _data(7)
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))


def test_no_gradient_elements_do_not_move_and_keep_state():
    model = _model()
    params = list(model.parameters())
    opt = Birder(params, lr=0.1, weight_decay=0.1)
    _train(model, opt, 2)
    weight = params[0]
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[:4] = True  # only the first 4 rows were "active"
    frozen_rows = weight.detach()[4:].clone()
    m_before = opt.state[weight]["m"][4:].clone()
    opt.set_grad_mask({weight: mask})
    x, y = _data(3)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(weight[4:], frozen_rows)
    assert torch.equal(opt.state[weight]["m"][4:], m_before)
    assert not torch.equal(opt.state[weight]["m"][:4], torch.zeros(4, 6))


def test_amsgrad_keeps_b_non_decreasing():
    model = _model()
    opt = Birder(model.parameters(), lr=0.01, amsgrad=True)
    previous = None
    for step in range(5):
        _train(model, opt, 1)
        b = torch.cat([opt.state[p]["b"].reshape(-1) for p in model.parameters()])
        if previous is not None:
            assert (b >= previous).all()
        previous = b.clone()


def test_rms_normalizer_keeps_the_second_moment_and_steps_by_the_bias_corrected_ratio():
    # b is the EMA of g^2 with beta2; a gradient that never changes has m_hat / sqrt(b_hat) = sign(g) (to
    # rounding): every coordinate moves lr against it, each step, from the first.
    beta, beta2, lr = 0.9, 0.999, 0.01
    x = nn.Parameter(torch.linspace(-1, 1, 64))
    g = torch.where(torch.arange(64) % 3 == 0, -0.5, 2.0) * torch.linspace(0.1, 1, 64)
    opt = Birder([x], lr=lr, beta=beta, beta2=beta2, normalizer="rms")
    m, b = torch.zeros(64), torch.zeros(64)
    for _ in range(4):
        before = x.detach().clone()
        x.grad = g.clone()
        opt.step()
        m = m * beta + g * (1 - beta)
        b = b * beta2 + g * g * (1 - beta2)
        assert (((before - x.detach()) - lr * g.sign()).abs() < 1e-6).float().mean() >= 0.95
    torch.testing.assert_close(opt.state[x]["m"], m)
    torch.testing.assert_close(opt.state[x]["b"], b)
    assert opt.hook_state.compressor.rule_kwargs()["rms"]


def test_grad_clip_scales_what_enters_m_and_b_only_above_the_norm():
    beta = 0.9
    x = nn.Parameter(torch.zeros(4))
    opt = Birder([x], lr=0.01, beta=beta, grad_clip=1.0)
    big, small = torch.tensor([3.0, -4.0, 0.0, 0.0]), torch.tensor([0.3, -0.4, 0.0, 0.0])  # norms 5 and 0.5
    x.grad = big.clone()
    opt.step()
    torch.testing.assert_close(opt.state[x]["m"], (1 - beta) * big / 5)
    torch.testing.assert_close(opt.state[x]["b"], (1 - beta) * big.abs() / 5)
    assert opt.hook_state.compressor.last_grad_norm == pytest.approx(5.0)
    x.grad = small.clone()
    opt.step()  # below the norm: unscaled
    torch.testing.assert_close(opt.state[x]["m"], beta * (1 - beta) * big / 5 + (1 - beta) * small)
    assert torch.equal(x.grad, small)  # .grad itself is never scaled


def test_rms_ratio_scale_is_the_bias_correction():
    comp = Birder([nn.Parameter(torch.zeros(3))], lr=0.1, beta=0.9, beta2=0.99, normalizer="rms").hook_state.compressor
    for t in (1, 2, 10):
        want = (1 - 0.99 ** t) ** 0.5 / (1 - 0.9 ** t)
        assert comp.rule_kwargs(t - 1)["ratio_scale"] == pytest.approx(want, rel=1e-12)
    paper = Birder([nn.Parameter(torch.zeros(3))], lr=0.1).hook_state.compressor
    assert paper.rule_kwargs(5) == {"beta2": 0.9, "rms": False, "ratio_scale": 1.0}  # the paper's bits exactly


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": 0.0}, "lr=0.0: must be > 0"),
    ({"normalizer": "l2"}, "normalizer='l2': must be one of abs, rms"),
    ({"beta2": 1.0}, r"beta2=1.0: must be in \[0, 1\)"),
    ({"grad_clip": 0.0}, r"grad_clip=0.0: must be > 0"),
    ({"lr": -1}, "lr=-1: must be > 0"),
    ({"beta": 1.0}, r"beta=1.0: must be in \[0, 1\)"),
    ({"beta": -0.1}, r"beta=-0.1: must be in \[0, 1\)"),
    ({"weight_decay": -1.0}, "weight_decay=-1.0: must be >= 0"),
])
def test_bad_hyperparameters_fail_with_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Birder(_model().parameters(), **{"lr": 0.01, **kwargs})


def test_topology_validation():
    with pytest.raises(ValueError, match="num_nodes=3 does not divide the world size 4"):
        _topology_with_world(4, 3)


def _topology_with_world(world_size, num_nodes):
    import os
    old = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0")
    try:
        return Topology.from_env(num_nodes=num_nodes)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
