"""Issue 6 without process groups: crashes while writing a checkpoint, untrusted files, the non-finite rule.

Checkpoint files (writers killed mid-save, corrupt, malicious, without manifest) are in
tests/unit/test_checkpoint_files.py. The end-to-end faults (SIGKILL, SIGSTOP,
NaN on one rank, world-size changes) are in tests/distributed/test_faults.py.
"""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from dist_supernet.models import available_models, build_model
from dist_supernet.optim import Birder
from dist_supernet.train.config import ConfigError, register_resolvers, validate
from dist_supernet.train.faults import runtime_fault_message
from dist_supernet.train.nonfinite import NonFiniteGradientError, NonFiniteGuard
from dist_supernet.train.untrusted import (
    check_directory,
    check_fits_model,
    first_mismatch,
)

REPO = Path(__file__).resolve().parents[2]


# -- 6. untrusted files ---------------------------------------------------------------------


def _model(name: str, **overrides) -> tuple[nn.Module, dict]:
    cfg = {**compose_model(name), **overrides}
    return build_model(cfg, in_channels=1, image_size=8, num_classes=10), cfg


def compose_model(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))


def _saved(model: nn.Module, model_cfg: dict) -> dict:
    from omegaconf import OmegaConf

    return {"step": 5, "model": model.state_dict(), "config": OmegaConf.to_yaml({"model": model_cfg})}


def test_a_checkpoint_of_another_model_names_the_first_mismatched_key(tmp_path):
    path = tmp_path / "step_00000005.pt"
    mlp, mlp_cfg = _model("mlp")
    check_fits_model("trainer.resume", "auto", path, _saved(mlp, mlp_cfg), mlp, mlp_cfg)  # the same: fine
    narrow, narrow_cfg = _model("mlp", hidden=[128, 32])
    first = next(k for k, v in narrow.state_dict().items() if v.shape != mlp.state_dict()[k].shape)
    with pytest.raises(ConfigError) as info:
        check_fits_model("trainer.resume", "auto", path, _saved(mlp, mlp_cfg), narrow, narrow_cfg)
    assert str(info.value) == (
        f"trainer.resume=auto: step_00000005.pt is from a different model (saved with model=mlp, this run has "
        f"model=mlp): first mismatched key {first} (shape {list(mlp.state_dict()[first].shape)} in the checkpoint, "
        f"{list(narrow.state_dict()[first].shape)} in this model)")
    cnn, cnn_cfg = _model("cnn")
    with pytest.raises(ConfigError, match=r"saved with model=mlp, this run has model=cnn\): first mismatched key "
                                          r"\S+ \(in this model, not in the checkpoint\)$"):
        check_fits_model("trainer.resume", "auto", path, _saved(mlp, mlp_cfg), cnn, cnn_cfg)
    assert first_mismatch({"a": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)}) == (
        "b (in the checkpoint, not in this model)")


@pytest.mark.skipif("ofa_cnn" not in available_models(), reason="the supernet model family is not registered")
def test_a_checkpoint_of_another_search_space_names_the_first_mismatched_key(tmp_path):
    path = tmp_path / "step_00000005.pt"
    # Supernets: the same tensors, another search space (width choices) -> the config key is named.
    net, net_cfg = _model("ofa_cnn")
    other_cfg = {**net_cfg, "width_mults": [0.5, 1.0]}
    with pytest.raises(ConfigError, match=r"different model or search space .*first mismatched key "
                                          r"model\.width_mults \(\[0\.75,1\.0\] in the checkpoint, \[0\.5,1\.0\]"):
        check_fits_model("trainer.resume", "auto", path, _saved(net, net_cfg), net, other_cfg)
    # ... or with more kernel sizes: the weights themselves no longer fit.
    bigger, bigger_cfg = _model("ofa_cnn", kernel_sizes=[3, 5, 7])
    with pytest.raises(ConfigError, match=r"first mismatched key \S+ \(shape \[.*\] in the checkpoint"):
        check_fits_model("trainer.resume", "auto", path, _saved(net, net_cfg), bigger, bigger_cfg)


def test_directories_named_in_the_config_are_checked(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    check_directory("trainer.checkpoint_dir", str(tmp_path / "new" / "deeper"))  # creatable: fine
    with pytest.raises(ConfigError, match=r"^trainer\.checkpoint_dir=.*/file: is a file, not a directory$"):
        check_directory("trainer.checkpoint_dir", str(a_file))
    with pytest.raises(ConfigError, match=r"/file/sub: cannot be created: .*/file is a file$"):
        check_directory("trainer.checkpoint_dir", str(a_file / "sub"))


def _compose(*overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=["model=mlp", *overrides])


@pytest.mark.parametrize("override, message", [
    ("trainer.max_consecutive_skips=0", "trainer.max_consecutive_skips=0: must be >= 1"),
    ("trainer.timeout_s=0", "trainer.timeout_s=0: must be > 0 (seconds)"),
    ("compression.timeout_s=-1", "compression.timeout_s=-1: must be > 0 or null"),
    ("trainer.inject_nan_at_steps=[0]", "trainer.inject_nan_at_steps=[0]: steps are 1-based"),
    # issue 22: the docs always said >= 2 (a damaged newest checkpoint must leave one to resume from)
    ("trainer.keep_checkpoints=1", "trainer.keep_checkpoints=1: must be >= 2"),
    ("trainer.sync_check_every=-1", "trainer.sync_check_every=-1: must be >= 0 (0 = only before each checkpoint"),
    ("trainer.checkpoint_dir=/etc/hostname", "trainer.checkpoint_dir=/etc/hostname: is a file, not a directory"),
    ("trainer.resume=/etc", "trainer.resume=/etc: expected auto, never, or the path of a checkpoint file"),
])
def test_reliability_knobs_are_validated_in_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        validate(_compose(override))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_reliability_defaults():
    cfg = validate(_compose())
    assert (cfg.trainer.max_consecutive_skips, cfg.trainer.timeout_s, cfg.trainer.inject_nan_at_steps) == (5, 600, [])
    assert cfg.compression.timeout_s is None  # = trainer.timeout_s


# -- 3. the non-finite rule, one process ------------------------------------------------------


def _nan_grads(model: nn.Module, names: set[str]) -> None:
    for name, p in model.named_parameters():
        p.grad = torch.ones_like(p)
        if name in names:
            p.grad.view(-1)[-1] = float("inf") if name.endswith("bias") else float("nan")


@pytest.mark.parametrize("make", [
    lambda m: torch.optim.AdamW(m.parameters(), lr=0.1),
    lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    # local Birder with its parameter groups in the reverse order: the index it reports is mapped to a name
    lambda m: Birder([{"params": list(m.parameters())[::-1]}], lr=0.1),
], ids=["adamw", "sgd", "birder-local"])
def test_guard_skips_counts_and_stops_naming_step_and_parameter(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = make(model)
    guard = NonFiniteGuard(opt, model, max_consecutive_skips=2, verbose=False)
    _nan_grads(model, set())
    assert guard.step(1) is True
    before = [p.detach().clone() for p in model.parameters()]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    _nan_grads(model, {"2.weight", "0.bias"})
    assert guard.step(2) is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state_after = [opt.state[p] for p in model.parameters()]
    if isinstance(opt, Birder):
        # Birder's guarantee (issue 9): the non-finite elements never enter m, b; the finite ones of the step do.
        nonfinite = [~torch.isfinite(p.grad) for p in model.parameters()]
        assert all(torch.equal(a[k][bad], b[k][bad]) and bool(torch.isfinite(b[k]).all())
                   for a, b, bad in zip(state_before, state_after, nonfinite) for k in a)
    else:
        assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                   for a, b in zip(state_before, state_after))  # Adam moments, momentum buffers
    assert (guard.skipped_steps, guard.consecutive_skips) == (1, 1)
    assert guard.last_skip == {"step": 2, "param": "0.bias", "num_params": 2}  # named_parameters order
    _nan_grads(model, set())
    assert guard.step(3) is True and guard.consecutive_skips == 0
    _nan_grads(model, {"2.bias"})
    guard.step(4)
    with pytest.raises(NonFiniteGradientError, match=r"^step 5: non-finite gradient in 2 consecutive steps "
                                                     r"\(trainer\.max_consecutive_skips=2\), first offending "
                                                     r"parameter 2\.bias \(1 of 4 parameters non-finite\); stopping$"):
        guard.step(5)
    assert guard.state_dict() == {"skipped_steps": 3, "consecutive_skips": 2}


def test_birder_owns_the_skip_counters_the_guard_reads_and_checkpoints():
    """One counter per run: the guard neither double-counts Birder's skips nor keeps its own; it names the
    parameter from Birder's public skip record."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = Birder([{"params": list(model.parameters())[::-1]}], lr=0.1)
    guard = NonFiniteGuard(opt, model, max_consecutive_skips=3, verbose=False)
    assert guard.skips is opt.skips
    _nan_grads(model, {"2.weight", "0.bias"})
    assert guard.step(1) is False
    assert (opt.skipped_steps, opt.consecutive_skips, guard.skipped_steps, guard.consecutive_skips) == (1, 1, 1, 1)
    assert opt.last_skip["param"] is model[2].weight  # the first in the optimizer's own (reversed) order
    guard.load_state_dict({"skipped_steps": 4, "consecutive_skips": 2})  # a resume restores the one counter
    assert (opt.skipped_steps, opt.consecutive_skips) == (4, 2)
    _nan_grads(model, set())
    assert guard.step(2) is True and (opt.skipped_steps, opt.consecutive_skips) == (4, 0)
    assert guard.state_dict() == {"skipped_steps": 4, "consecutive_skips": 0}


def test_runtime_faults_become_one_line():
    hook_error = RuntimeError("Unable to cast hierarchical collective failed in stage 'all-gather node bits' "
                              "(inter-node) on rank 0 of 2: [gloo.cc:78] Timed out waiting 3000ms\nfor recv to Tensor")
    assert runtime_fault_message(hook_error) == ("hierarchical collective failed in stage 'all-gather node bits' "
                                                 "(inter-node) on rank 0 of 2: [gloo.cc:78] Timed out waiting 3000ms "
                                                 "for recv")
    ddp_error = RuntimeError("allreduce collective failed in stage 'all-reduce gradient bucket' (world) on rank 1 "
                             "of 4: Got the following error when running the callback: RuntimeError: Timed out\n\n"
                             "At:\n  /torch/distributed/algorithms/ddp_comm_hooks/default_hooks.py(24): hook")
    assert runtime_fault_message(ddp_error) == ("allreduce collective failed in stage 'all-reduce gradient bucket' "
                                                "(world) on rank 1 of 4: Got the following error when running the "
                                                "callback: RuntimeError: Timed out")
    assert runtime_fault_message(NonFiniteGradientError("step 3: ...")) == "step 3: ..."
    assert runtime_fault_message(RuntimeError("a bug")) is None  # keeps its traceback


def test_collective_stage_names_peer_failures_only():
    import torch.distributed as dist

    from dist_supernet.comm.collectives import CollectiveError
    from dist_supernet.train.distributed import collective_stage

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(CollectiveError, match=r"^trainer collective failed in stage 'train step 7' \(world\) on "
                                                  r"rank 0 of 1: \[gloo/x.cc:78\] Timed out waiting 3000ms$"):
            with collective_stage("train step 7"):  # e.g. DDP's buffer broadcast in forward
                raise RuntimeError("[gloo/x.cc:78] Timed out waiting 3000ms")
        named = RuntimeError("two_phase collective failed in stage 'all-to-all chunks' (world) on rank 0 of 1: x")
        with pytest.raises(RuntimeError) as info:
            with collective_stage("train step 7"):
                raise named
        assert info.value is named  # already named: unchanged
        with pytest.raises(RuntimeError, match="^a bug$"):
            with collective_stage("train step 7"):
                raise RuntimeError("a bug")
    finally:
        dist.destroy_process_group()


# -- 10. the replica checksum -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_replica_checksum_changes_with_any_one_element_by_one_ulp(dtype):
    """Equal parameters give equal sums (exact integer addition); one element one ulp away changes the sum."""
    from dist_supernet.train.replicas import param_checksums

    torch.manual_seed(0)
    params = [torch.randn(257).to(dtype), torch.randn(3, 5).to(dtype), torch.zeros(1, dtype=dtype)]
    base = param_checksums(params)
    assert base.dtype == torch.int64 and base.shape == (3,)
    assert torch.equal(base, param_checksums([p.clone() for p in params]))
    for which, index in [(0, 0), (0, 256), (1, 7), (2, 0)]:
        moved = [p.clone() for p in params]
        flat = moved[which].view(-1)
        flat[index] = torch.nextafter(flat[index], torch.tensor(float("inf"), dtype=dtype))
        differ = (param_checksums(moved) != base).nonzero().flatten().tolist()
        assert differ == [which], (dtype, which, index)
