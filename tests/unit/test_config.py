"""Every config in conf/ composes with Hydra's compose API and validates; every bad input is one line.

The bad-input cases run through the validator here (milliseconds each); two of
them also run through a real torchrun in tests/distributed/test_train_app.py,
and one through the CLI below.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dist_supernet.models import available_models
from tests.distributed import jobs
from dist_supernet.train import config as config_module
from dist_supernet.train.config import (
    GROUPS,
    ConfigError,
    check_group_choices,
    register_resolvers,
    validate,
    validate_layout,
)
from tests.configs import compose_train

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"
CHOICES = {group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) for group in GROUPS}


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mine.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((50, 6, 6), dtype=np.float32), y=rng.integers(0, 3, 50))
    return str(path)


_compose = compose_train


def _optimizer(choice: str) -> str:
    """The optimizer a choice of the optim group builds: a preset (``birder_transformer``) names its base."""
    return choice.split("_")[0]


def test_every_config_composes_and_validates(npz_path):
    """Each choice of each group, with the others at a compatible default (composing costs ~0.1 s)."""
    registered = set(available_models())
    checked = []
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for group, choice in ((g, c) for g in ("compression", "optim", "model", "data") for c in CHOICES[g]):
            overrides = [f"{group}={choice}", f"data.path={npz_path}" if choice == "npz" else "data.path=null"]
            if group == "optim" and _optimizer(choice) != "birder":
                overrides.append("compression=none")  # the 1-bit hook needs Birder to apply its update
            cfg = compose("train", overrides=overrides)
            if group == "model" and choice not in registered:
                continue  # a family whose builder is not registered in dist_supernet.models yet
            run = validate(cfg)
            validated = getattr(run, group)
            want = _optimizer(choice) if group == "optim" else choice
            assert (validated["name"] if group == "model" else validated.name) == want
            checked.append(f"{group}={choice}")
        # The one rule across groups: compression=birder needs optim=birder.
        for optim in CHOICES["optim"]:
            cfg = compose("train", overrides=["compression=birder", f"optim={optim}"])
            if _optimizer(optim) == "birder":
                validate(cfg)
            else:
                with pytest.raises(ConfigError, match=r"^optim\.name=.*needs optim=birder$"):
                    validate(cfg)
    assert {"compression=powersgd", "optim=sgd", "model=cnn", "data=npz", "data=mnist5k"} <= set(checked)


def test_defaults_are_birder_supernet_digits():
    run = validate(_compose())
    assert (run.compression.name, run.compression.collective, run.optim.name) == ("birder", "auto", "birder")
    assert (run.model["name"], run.data.name, run.trainer.resume) == ("ofa_cnn", "digits", "auto")


@pytest.mark.parametrize("collective", ["allgather", "two_phase", "hierarchical"])
def test_collective_override(collective):
    assert validate(_compose(f"compression.collective={collective}")).compression.collective == collective


def test_every_default_has_a_why_comment():
    for path in CONF_DIR.glob("[!s]*/*.yaml"):  # conf/supernet/ has its own owner and test
        if path.parent.name == "model" and path.stem not in ("mlp", "cnn"):
            continue
        for line in path.read_text().splitlines():
            if line and not line.startswith("#") and ":" in line and not line.startswith("name:"):
                assert "# why:" in line, f"{path.relative_to(REPO)}: {line!r} has no '# why:'"


def test_hydra_run_dir_is_shared_and_only_rank0_writes_hydra_files(monkeypatch):
    monkeypatch.setenv("DIST_SUPERNET_RUN_STAMP", "stamp")
    cfg = _compose(hydra_config=True)
    assert cfg.hydra.run.dir == "outputs/stamp"
    assert cfg.hydra.output_subdir == ".hydra"
    log_file = OmegaConf.to_container(cfg.hydra.job_logging)["handlers"]["file"]["filename"]
    assert log_file == "${hydra.runtime.output_dir}/train_rank${oc.env:RANK,0}.log"  # one file per rank
    monkeypatch.setenv("RANK", "1")
    assert _compose(hydra_config=True).hydra.output_subdir is None
    assert _compose("hydra.run.dir=/somewhere", hydra_config=True).hydra.run.dir == "/somewhere"


def test_run_stamp_is_the_torchrun_agents_start_time():
    """Two workers of one parent, started a second apart, agree (``${now:}`` would not)."""
    child = "from dist_supernet.train.config import run_stamp; print(run_stamp())"
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = dict(os.environ, TORCHELASTIC_RUN_ID="x")
        env.pop("DIST_SUPERNET_RUN_STAMP", None)
        run = lambda: subprocess.run([sys.executable, "-c", {child!r}], env=env, capture_output=True, text=True).stdout
        first = run(); time.sleep(1.1); print(first.strip(), run().strip())
    """)
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    first, second = out.stdout.split()
    assert first == second and len(first) == len("2024-01-01_00-00-00"), out


BAD_INPUTS = [
    (["optim.lr=-1.0"], "optim.lr=-1.0: must be > 0"),
    (["optim=adamw", "compression=none", "optim.lr=0"], "optim.lr=0: must be > 0"),
    (["optim.beta=1.0"], "optim.beta=1.0: must be in [0, 1)"),
    (["optim.beta=-0.1"], "optim.beta=-0.1: must be in [0, 1)"),
    (["optim.normalizer=l2"], "optim.normalizer=l2: expected one of abs, rms"),
    (["optim.grad_clip=0"], "optim.grad_clip=0: must be > 0"),
    (["trainer.parallelism=hsdp", "optim.grad_clip=1.0"], "optim.grad_clip=1.0: Birder's per-rank clipping runs"),
    (["optim.beta2=1.5"], "optim.beta2=1.5: must be in [0, 1), or null"),
    (["compression.collective=ring"],
     "compression.collective=ring: expected one of auto, allgather, two_phase, hierarchical"),
    (["compression=none", "compression.collective=two_phase"], "compression.collective=two_phase: compression=none"),
    (["compression.num_nodes=0"], "compression.num_nodes=0: must be >= 1 or null"),
    (["data=npz", "data.path=/no/such/file.npz"], "data.path=/no/such/file.npz: file not found"),
    (["data=npz"], "data.path=???: required"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5: must be in (0, 1)"),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be >= 1"),
    (["trainer.max_steps=abc"], "trainer.max_steps=abc: expected int"),
    (["trainer.resume=/no/ckpt.pt"], "trainer.resume=/no/ckpt.pt: expected auto, never, or the path"),
    (["compression=none", "optim=adamw", "optim.betas=[0.9,1.5]"], "optim.betas=[0.9,1.5]: must be two numbers"),
    (["compression=none", "optim=sgd", "optim.momentum=1.0"], "optim.momentum=1.0: must be in [0, 1)"),
    (["compression=powersgd", "optim=sgd", "compression.rank=0"], "compression.rank=0: must be >= 1"),
    (["optim=adamw"], "optim.name=adamw: compression=birder sends 1-bit Birder updates and needs optim=birder"),
    (["model.name=resnet"], "model.name=resnet: expected one of"),
    (["optim.schedule=linear"], "optim.schedule=linear: expected one of constant, cosine"),
    (["trainer.parallelism=fsdp"], "trainer.parallelism=fsdp: expected one of ddp, hsdp"),
    (["trainer.parallelism=hsdp", "compression=fp16", "optim=adamw"],
     "compression.name=fp16: trainer.parallelism=hsdp takes compression=birder (1 bit across nodes) or "
     "compression=none"),
    (["trainer.tensorboard=maybe"], "trainer.tensorboard=maybe: expected auto, true or false"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_key_and_value(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(_compose(*overrides))
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text


def test_tensorboard_true_without_tensorboard_fails_at_start_auto_does_not(monkeypatch):
    # As if tensorboard were not installed: torch.utils.tensorboard does not import.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError) as info:
        validate(_compose("trainer.tensorboard=true"))
    assert str(info.value).startswith("trainer.tensorboard=true: needs the tensorboard package (pip install "
                                      "tensorboard;") and "\n" not in str(info.value)
    for value, expected in (("auto", "auto"), ("false", False)):
        assert validate(_compose(f"trainer.tensorboard={value}")).trainer.tensorboard == expected


def test_layout_must_divide_the_world_size(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    run = validate(_compose("compression.collective=hierarchical", "compression.num_nodes=3"))
    with pytest.raises(ConfigError, match=r"^compression\.num_nodes=3: must divide the world size 2$"):
        validate_layout(run.compression, world_size=2)
    validate_layout(run.compression, world_size=6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"LOCAL_WORLD_SIZE=4 does not divide the world size 6"):
        validate_layout(validate(_compose()).compression, world_size=6)


@pytest.mark.parametrize("args, message", [
    (["compression=foo"], "compression=foo: expected one of bf16, birder, fp16, none, powersgd"),
    (["trainer.max_steps=3", "optim=adam"], "optim=adam: expected one of adamw, birder, birder_transformer, sgd"),
])
def test_unknown_group_choice_is_one_line_before_hydra(args, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[") + "$"):
        check_group_choices(args, CONF_DIR)


def test_known_choices_and_sweeps_pass_the_precheck():
    check_group_choices(["compression=fp16", "optim=sgd", "-m", "compression=none,fp16", "x=1"], CONF_DIR)


def test_cli_prints_one_line_and_exits_2():
    """The real entry point, one process (no torchrun): ``error: key=value: reason`` and status 2."""
    for args, line in ((["optim.lr=-1.0"], "error: optim.lr=-1.0: must be > 0"),
                       (["compression=foo"],
                        "error: compression=foo: expected one of bf16, birder, fp16, none, powersgd")):
        out = jobs.run(jobs.single(*args, "hydra.run.dir=/tmp/never-used"), cwd=REPO, timeout_s=120)
        assert out.returncode == 2, out
        assert out.stderr.strip().splitlines() == [line], out.stderr
    assert OmegaConf.has_resolver("run_stamp")


def test_config_choices_are_the_registries_and_importing_the_config_needs_no_torch():
    from dist_supernet.comm import BASELINES, collective_choices

    assert collective_choices()[:4] == ("auto", "allgather", "two_phase", "hierarchical")
    assert list(config_module.compression_schemas())[:5] == ["birder", "none", "fp16", "bf16", "powersgd"]
    assert all(config_module.compression_schemas()[name] is BASELINES[name].config for name in BASELINES)
    # The entry point's first checks run before torch is imported (a typo fails in about a second).
    out = subprocess.run([sys.executable, "-c", "import sys, dist_supernet.train.config; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=60, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == "False", out
