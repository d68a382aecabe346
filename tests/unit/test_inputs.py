"""Issue 13, item 5: every input is checked before training, in one line naming the key.

Each case here was accepted before (and failed later, blaming something else,
or not at all): non-finite and absurd numbers, unknown keys at the top level
and in model groups, a CUDA device that does not exist, paths that pass
``os.access`` but cannot hold a file, and data files that are truncated, hold
NaN, or have absurd labels. The last tests run the launcher itself: a config
error is one line and exit status 2 before torchrun starts.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_supernet.data import load_dataset
from dist_supernet.models import build_model
from dist_supernet.train.checkpoint import read_checkpoint
from dist_supernet.train.config import ConfigError, validate
from dist_supernet.train.preflight import check_can_hold_file, check_resume, preflight
from dist_supernet.train.trainer import Trainer
from dist_supernet.train.untrusted import check_directory
from tests.distributed.jobs import launcher, run, single, torchrun
from tests.fault_report import record
from tests.configs import compose_train

REPO = Path(__file__).resolve().parents[2]
PLAIN = ["model=mlp", "compression=none", "optim=adamw"]


_compose = compose_train


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=inf"], "optim.lr=inf: must be a finite number"),
    (["optim.lr=nan"], "optim.lr=nan: must be a finite number"),
    (["optim.lr=1e6"], "optim.lr=1000000.0: must be <= 10.0"),
    (["optim.betas=[0.9,inf]"], "optim.betas=[0.9,inf]: must be a finite number"),
    (["optim.eps=inf"], "optim.eps=inf: must be a finite number"),
    (["trainer.timeout_s=1e300"], "trainer.timeout_s=1e+300: must be <= 604800"),
    (["trainer.timeout_s=inf"], "trainer.timeout_s=inf: must be a finite number"),
    (["compression=birder", "optim=birder", "compression.timeout_s=1e20"], "compression.timeout_s=1e+20: must be <= 604800"),
    (["trainer.seed=-1"], "trainer.seed=-1: must be in [0, 2147483648)"),
    (["data.split_seed=1099511627776"], "data.split_seed=1099511627776: must be in [0, 2147483648)"),
    (["+foo=1"], "foo=1: unknown top-level key (expected one of compression, optim, model, data, trainer, supernet, sync, plugins)"),
    (["+supernet.sampler_name=x"], "supernet.sampler_name=x: unknown key (expected one of sampler, distillation"),
])
def test_bad_numbers_and_unknown_keys_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(_compose(*PLAIN, *overrides))
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("model, message", [
    ({"name": "mlp", "hidden": [8], "hiden": [16]}, "model.hiden=[16]: unknown key for mlp"),
    ({"name": "cnn", "channel": [8]}, "model.channel=[8]: unknown key for cnn"),
])
def test_unknown_model_keys_are_refused(model, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_model(model, in_channels=1, image_size=8, num_classes=10)


def test_a_device_that_does_not_exist_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^trainer.device=cuda: no CUDA device is visible"):
        validate(_compose(*PLAIN, "trainer.device=cuda"))
    validate(_compose(*PLAIN, "trainer.device=auto"))  # auto falls back to the CPU
    # Under torchrun: more processes on this node than GPUs.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"^trainer.device=auto: LOCAL_RANK=1 needs GPU 1 but only 1 are visible"):
        validate(_compose(*PLAIN, "trainer.device=auto"))


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/proc", os.W_OK),
                    reason="needs a directory that passes os.access but cannot hold a file: /proc as root")
def test_a_path_that_passes_os_access_but_cannot_hold_a_file_fails_before_training(tmp_path):
    check_directory("trainer.checkpoint_dir", "/proc/dist_supernet_ckpts")  # the permission check passes ...
    with pytest.raises(ConfigError, match=r"^trainer.checkpoint_dir=/proc/dist_supernet_ckpts: cannot be created: "
                                          r"a file written to /proc fails \("):
        check_can_hold_file("trainer.checkpoint_dir", "/proc/dist_supernet_ckpts")  # ... writing one does not
    # Through the trainer's own start-up checks (no process group exists yet).
    cfg = _compose(*PLAIN, "trainer.checkpoint_dir=/proc/dist_supernet_ckpts")
    with pytest.raises(ConfigError, match=r"^trainer.checkpoint_dir=/proc/dist_supernet_ckpts: cannot be created"):
        Trainer(cfg, output_dir=tmp_path / "run", check_only=True)
    with pytest.raises(ConfigError, match=r"^hydra.run.dir=/sys/dist_supernet_run: cannot be created"):
        Trainer(_compose(*PLAIN), output_dir=Path("/sys/dist_supernet_run"), check_only=True)


def test_a_writable_path_passes_and_keeps_nothing(tmp_path):
    check_can_hold_file("hydra.run.dir", tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []  # nothing created, the probe file removed


@pytest.fixture(scope="module")
def bad_npz(tmp_path_factory) -> dict[str, Path]:
    """One good .npz and one per way of being bad."""
    d = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    x, y = rng.random((60, 8, 8), dtype=np.float32), np.arange(60) % 10
    files = {}

    def save(name, compressed=False, **arrays):
        files[name] = d / f"{name}.npz"
        (np.savez_compressed if compressed else np.savez)(files[name], **arrays)

    save("good", x=x, y=y)
    save("compressed", compressed=True, x=x, y=y)
    for name, source in (("truncated", "good"), ("truncated_compressed", "compressed")):
        data = files[source].read_bytes()
        files[name] = d / f"{name}.npz"
        files[name].write_bytes(data[: len(data) * 2 // 3])
    nan_x = x.copy()
    nan_x[17, 3, 4] = np.nan
    save("nan_pixel", x=nan_x, y=y)
    inf_x = x.astype(np.float64)
    inf_x[5, 0, 0] = 1e300  # finite in float64, inf once cast to float32
    save("huge_pixel", x=inf_x, y=y)
    big_y = y.copy()
    big_y[9] = 10**9
    save("absurd_label", x=x, y=big_y)
    save("no_x", images=x, y=y)
    return files


@pytest.mark.parametrize("name, message", [
    ("truncated", "not a readable .npz (truncated or corrupt: BadZipFile"),
    ("truncated_compressed", "not a readable .npz (truncated or corrupt: BadZipFile"),
    ("nan_pixel", "x holds 1 non-finite or huge (> 1e+15) values, the first in sample "),
    ("huge_pixel", "x holds 1 non-finite or huge (> 1e+15) values, the first in sample "),
    ("absurd_label", "label 1000000000 in y (sample 9) means more than 100000 classes"),
    ("no_x", "needs arrays 'x' and 'y' (has ['images', 'y'])"),
])
def test_bad_data_files_are_one_line_naming_data_path(bad_npz, name, message):
    load_dataset("npz", path=str(bad_npz["good"]))  # the same arrays, undamaged, load
    with pytest.raises(ValueError) as error:
        load_dataset("npz", path=str(bad_npz[name]))
    text = str(error.value)
    assert text.startswith(f"data.path={bad_npz[name]}: {message}"), text
    assert "\n" not in text


def _launcher(*overrides, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    out = run(launcher(*overrides), cwd=cwd, timeout_s=120, MAX_RESTARTS="3")
    return out, time.monotonic() - started


def test_the_launcher_shows_one_line_and_exits_2_without_starting_torchrun(tmp_path):
    """README command 1 with a bad value (and MAX_RESTARTS=3): one line, status 2, no retries, no traceback."""
    out, elapsed = _launcher("model=mlp", "optim.lr=inf", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == ["error: optim.lr=inf: must be a finite number"], out.stderr[-3000:]
    assert out.stdout == "" and not (tmp_path / "run").exists()  # torchrun never started, nothing written
    record("config error through the launcher (optim.lr=inf)", detected_s=round(elapsed, 1),
           note="whole launcher, start to exit 2")


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint of step 2 (AdamW on DDP's fp32 all-reduce), written by the trainer in this process."""
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    trainer = Trainer(_compose(*PLAIN, "trainer.max_steps=2", "trainer.checkpoint_every=0"), output_dir=run_dir)
    try:  # a world of one in this process
        trainer.fit()
    finally:
        trainer.close()
    (ckpt,) = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")]
    return ckpt


def test_paths_the_preflight_cannot_stat_are_one_line_and_status_2_under_the_launcher_and_torchrun(tmp_path):
    """Issue 22: a hydra.run.dir component over 255 bytes (was an OSError traceback from the pre-flight) and a
    run.lock that is a directory (passed the pre-flight, then a traceback from every rank under torchrun)."""
    long_dir = tmp_path / ("a" * 300)
    # The launchers' pre-flight itself (they exit with its status: test_the_launcher_shows_one_line_...).
    out = run(single("--check", "model=mlp", f"hydra.run.dir={long_dir}"), cwd=tmp_path, timeout_s=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: hydra.run.dir={long_dir}: its component {'a' * 20}... is 300 bytes, more than the 255 a file name "
        "may have here"], out.stderr[-3000:]
    lock_dir = tmp_path / "run" / "run.lock"
    lock_dir.mkdir(parents=True)
    line = (f"error: hydra.run.dir={tmp_path / 'run'}: {lock_dir} is a directory, not this project's lock file; remove "
            "it (or choose another directory) so that the job can lock its run directory")
    out, _ = _launcher("model=mlp", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [line], out.stderr[-3000:]
    assert out.stdout == ""  # torchrun never started
    # Direct torchrun (no pre-flight): each worker says the same one line and exits 2, before Hydra writes anything.
    # torchrun stops the other worker (SIGTERM) as soon as the first exits, which may be before it has said it.
    out = run(torchrun("model=mlp", f"hydra.run.dir={tmp_path / 'run'}"), cwd=tmp_path, timeout_s=120)
    errors = [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("error:")]
    assert out.returncode != 0 and errors in ([line], [line, line]), out.stderr[-3000:]
    assert "exitcode: 2" in out.stderr and not re.search(r'File ".*dist_supernet', out.stdout + out.stderr)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.lock"]


def test_an_explicit_resume_that_does_not_fit_fails_in_the_preflight(plain_checkpoint, tmp_path):
    """The trainer checks ``trainer.resume=<path>`` once its process group exists; the pre-flight before any."""
    ckpt = plain_checkpoint

    def preflight_resume(*overrides):
        check_resume(Trainer(_compose(*PLAIN, *overrides, f"trainer.resume={ckpt}"), output_dir=tmp_path / "new",
                             check_only=True))

    preflight_resume()  # the same model and recipe
    with pytest.raises(ConfigError, match=rf"^trainer.resume={ckpt}: {ckpt.name} is from a different model"):
        preflight_resume("model=cnn")
    with pytest.raises(ConfigError) as error:
        preflight_resume("optim=sgd")
    assert str(error.value).startswith(f"trainer.resume={ckpt}: ") and "optim" in str(error.value), str(error.value)
    preflight_resume("optim=sgd", "trainer.resume_weights_only=true")  # the documented override
    assert not (tmp_path / "new").exists()


def test_a_resume_that_cannot_continue_is_one_line_before_training(plain_checkpoint, tmp_path):
    """Issue 22: what the checkpoint's own files say is checked even without a manifest; a checkpoint past
    trainer.max_steps and a path to a file inside a checkpoint are named for what they are."""
    copy = tmp_path / "copy" / plain_checkpoint.name
    shutil.copytree(plain_checkpoint, copy)
    (copy / "manifest.json").unlink()  # the recipe is unknown now: no config to compare

    def preflight_resume(path, *overrides):
        check_resume(Trainer(_compose(*PLAIN, *overrides, f"trainer.resume={path}"), output_dir=tmp_path / "new",
                             check_only=True))

    preflight_resume(copy)  # the same optimizer: fine
    with pytest.raises(ConfigError) as error:
        preflight_resume(copy, "optim=sgd")
    assert str(error.value) == (f"trainer.resume={copy}: {copy.name} holds adamw optimizer state (replicated state), "
                                "this run has optim=sgd; trainer.resume_weights_only=true loads only its model weights")
    with pytest.raises(ConfigError) as error:
        preflight_resume(plain_checkpoint, "trainer.max_steps=1")
    assert str(error.value) == (f"trainer.max_steps=1: the checkpoint to resume, {plain_checkpoint.name}, is at step 2, "
                                "past it: raise trainer.max_steps to train on, or resume an earlier checkpoint")
    # trainer.resume=<step_N>/manifest.json is a file inside a checkpoint, not an older single-file checkpoint.
    with pytest.raises(ConfigError) as error:
        validate(_compose(*PLAIN, f"trainer.resume={plain_checkpoint / 'manifest.json'}"))
    assert str(error.value) == (f"trainer.resume={plain_checkpoint / 'manifest.json'}: names manifest.json, a file "
                                f"inside the checkpoint directory {plain_checkpoint.name}; name the directory itself: "
                                f"trainer.resume={plain_checkpoint}")
    # The trainer itself (a world of one in this process), in a copy of that run directory: resume=auto finds
    # the checkpoint past max_steps and refuses it the same way; resume=never (the reproduction: a fresh
    # run among another run's checkpoints, which retention used to delete) refuses to start, touching nothing.
    run_dir = tmp_path / "again"
    shutil.copytree(plain_checkpoint.parent.parent, run_dir, ignore=shutil.ignore_patterns("run.lock"))
    for overrides, message in [
        (["trainer.max_steps=1"], r"^trainer\.max_steps=1: the checkpoint to resume, step_00000002, is at step 2, "
                                  r"past it"),
        (["trainer.resume=never", "trainer.seed=1", "trainer.keep_checkpoints=2"],
         rf"^trainer\.resume=never: {run_dir / 'checkpoints'} holds 1 checkpoint of another run \(newest "
         r"step_00000002, run \S+\); a run that does not resume from them would mix its checkpoints with theirs: "
         r"resume that run \(trainer\.resume=auto\), choose another hydra\.run\.dir"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Trainer(_compose(*PLAIN, *overrides), output_dir=run_dir)
        assert not dist.is_initialized()  # a refused resume releases the process group and the locks
    # The launchers' pre-flight makes the same refusal before torchrun starts.
    with pytest.raises(ConfigError, match=r"^trainer\.resume=never: .* holds 1 checkpoint of another run"):
        preflight([*PLAIN, "trainer.resume=never", f"hydra.run.dir={run_dir}"], REPO / "conf")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["run.lock", plain_checkpoint.name]
    read_checkpoint(run_dir / "checkpoints" / plain_checkpoint.name)  # untouched: every digest still matches


def test_paths_that_cannot_even_be_looked_at_are_one_line(tmp_path):
    """Issue 22: a path component over 255 bytes (os.stat raises ENAMETOOLONG) and a run.lock that is a directory."""
    from dist_supernet.train.runlock import RunDirLock, check_free

    long_dir = tmp_path / ("a" * 300) / "run"
    for check in (check_can_hold_file, check_directory):
        with pytest.raises(ConfigError) as error:
            check("trainer.checkpoint_dir", str(long_dir))
        assert str(error.value) == (f"trainer.checkpoint_dir={long_dir}: its component {'a' * 20}... is 300 bytes, "
                                    "more than the 255 a file name may have here")
    with pytest.raises(ConfigError, match=r"^trainer\.checkpoint_dir=.*: its component a{20}\.\.\. is 300 bytes"):
        validate(_compose(*PLAIN, f"trainer.checkpoint_dir={long_dir}"))
    (tmp_path / "run" / "run.lock").mkdir(parents=True)
    expected = (f"hydra.run.dir={tmp_path / 'run'}: {tmp_path / 'run' / 'run.lock'} is a directory, not this "
                "project's lock file; remove it (or choose another directory) so that the job can lock its run directory")
    for check in (lambda: check_free(tmp_path / "run"), lambda: RunDirLock(tmp_path / "run").acquire()):
        with pytest.raises(ConfigError) as error:
            check()
        assert str(error.value) == expected
