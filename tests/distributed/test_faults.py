"""Issue 6, fault by fault, through the real training app: torchrun, gloo on loopback, faults sent by the test.

Every fault is injected from this process (SIGKILL / SIGSTOP of a worker found
among torchrun's children, a truncated file) or by a documented fault-injection
knob (``trainer.inject_nan_at_steps``), and every test measures how long the
fault took to be reported. With ``DIST_SUPERNET_FAULT_REPORT=<file>`` each
measurement is appended there as one JSON line (docs/reliability.md quotes them).

Spawns are few and tiny (digits, MLP, <= 40 steps): one uninterrupted reference
run serves the kill test (bit-identity), the world-size changes (2 -> 4, 2 -> 1)
and the mismatched-model check.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dist_supernet.train.checkpoint import read_checkpoint
from tests.distributed.jobs import REPO, Job, kill_all, read_run, single, torchrun, wait_for_step
from tests.fault_report import record

# 40 steps, a checkpoint every 10, a metrics row every step.
RUN = ["model=mlp", "trainer.max_steps=40", "trainer.checkpoint_every=10", "trainer.keep_checkpoints=4",
       "trainer.log_every=1", "trainer.eval_every=20"]
HUNG_TIMEOUT_S = 3.0

_JOBS: list[Job] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """A failed or timed-out test must not leave workers running (torchrun starts each in its own session)."""
    yield
    kill_all(_JOBS)


def start(overrides, *, cwd, nproc=2, max_restarts=0) -> Job:
    """torchrun (or, with ``nproc=1``, one plain process) in the background."""
    cmd = single(*overrides) if nproc == 1 else torchrun(*overrides, nproc=nproc, max_restarts=max_restarts)
    return Job(cmd, cwd=cwd, jobs=_JOBS)


def run_once(overrides, *, cwd, nproc=2, check=True) -> subprocess.CompletedProcess:
    """torchrun (nproc >= 2) or one plain process (nproc == 1), to the end; stdout holds stderr too."""
    job = start(overrides, cwd=cwd, nproc=nproc)
    out = subprocess.CompletedProcess(job.proc.args, job.wait(), stdout=job.text, stderr="")
    if check:
        assert out.returncode == 0, out.stdout[-6000:]
    return out


def load(path: Path) -> dict:
    """A whole checkpoint directory in this process (digests checked, weights_only)."""
    return read_checkpoint(path)


def same_tensors(a, b) -> bool:
    """Bit-identical nested state (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: Birder, 2 ranks, 40 steps, checkpoints at 10, 20, 30, 40."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_once([*RUN, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    return run_dir


# -- 1. a worker killed mid-run ----------------------------------------------------------


def kill_resume_compare(reference: Path, overrides: list[str], tmp_path: Path, *, kill_after: int, every: int,
                        max_steps: int, fault: str) -> dict:
    """SIGKILL rank 1 once metrics.jsonl shows ``kill_after``; torchrun --max-restarts=1 resumes; compare."""
    run_dir = tmp_path / "run"
    job = start([*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path, max_restarts=1)
    seen = wait_for_step(run_dir, kill_after, job)
    killed_at = time.monotonic()
    os.kill(job.worker_pids()[1], signal.SIGKILL)
    assert job.wait() == 0, job.text[-3000:]
    failed_at, _ = job.wait_for_line(r"failed \(exitcode: -9\)|Signal 9 \(SIGKILL\)", after=killed_at)
    resumed_at, resumed_line = job.wait_for_line(r"resumed from .* at step \d+", after=killed_at)

    summary, rows = read_run(run_dir)
    reference_summary, reference_rows = read_run(reference)
    resumed = summary["resumed_from_step"]
    # The last complete checkpoint when the kill landed (rank 1 may be a step ahead of rank 0's metrics).
    assert resumed is not None and resumed % every == 0
    assert every * (seen // every) <= resumed <= every * ((seen + 2) // every) and resumed < max_steps
    assert f"at step {resumed}" in resumed_line
    # Every step exactly once in the end, the metrics of the redone steps equal the uninterrupted run's,
    # and the final parameters are bit-identical.
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1))
    timings = ("wall_time_s", "train_time_s")  # the only columns that differ
    assert rows == [dict(r, **{k: row[k] for k in timings}) for r, row in zip(reference_rows, rows)]
    assert summary["params_sha256"] == reference_summary["params_sha256"] and summary["params_in_sync"]
    assert summary["bytes_sent_total"] == reference_summary["bytes_sent_total"]
    record(fault, detected_s=round(failed_at - killed_at, 2), resumed_s=round(resumed_at - killed_at, 2),
           killed_after_step=seen, resumed_from_step=resumed, steps_redone=seen - resumed, bit_identical=True,
           model_state_bytes=4 * summary["num_params"], model_state_bytes_lost=0)
    return summary


def test_sigkilled_worker_restarts_resumes_and_ends_bit_identical(reference, tmp_path):
    """SIGKILL rank 1 after step 15 of 40; torchrun restarts the group, which redoes the steps after step 10."""
    kill_resume_compare(reference, RUN, tmp_path, kill_after=15, every=10, max_steps=40, fault="worker SIGKILL")


# The supernet main job (ofa_cnn, sandwich sampler, in-place distillation), with a minimal search at the end.
SUPERNET = ["model=ofa_cnn", "supernet=sandwich", "trainer.max_steps=8", "trainer.checkpoint_every=3",
            "trainer.log_every=1", "trainer.eval_every=0", "supernet.search.population_size=4",
            "supernet.search.num_generations=1", "supernet.bn_recalibration.num_batches=1"]


def test_sigkilled_worker_of_the_supernet_job_resumes_its_sampler_bit_identically(tmp_path_factory, tmp_path):
    """The same with the supernet job: the archs drawn after the resume are the ones of the uninterrupted run."""
    pytest.importorskip("dist_supernet.train.supernet_trainer", reason="the supernet job is not in this checkout")
    reference_dir = tmp_path_factory.mktemp("supernet_reference") / "run"
    run_once([*SUPERNET, f"hydra.run.dir={reference_dir}"], cwd=reference_dir.parent)
    summary = kill_resume_compare(reference_dir, SUPERNET, tmp_path, kill_after=4, every=3, max_steps=8,
                                  fault="worker SIGKILL (supernet job)")
    assert "arch_sampler" in load(tmp_path / "run" / "checkpoints" / "step_00000006")["extra"]
    assert summary["supernet"]["searched"] == json.loads((reference_dir / "summary.json").read_text()
                                                         )["supernet"]["searched"]


# -- 4. a hung peer ----------------------------------------------------------------------


@pytest.mark.parametrize("name, overrides", [
    # Birder's 1-bit hook on its own groups (compression.timeout_s), two pretend nodes: inter-node stages
    ("birder-hierarchical", ["compression.collective=hierarchical", "compression.num_nodes=2",
                             f"compression.timeout_s={HUNG_TIMEOUT_S}"]),
    # DDP's own fp32 all-reduce on the default group (trainer.timeout_s)
    ("fp32-sgd", ["compression=none", "optim=sgd"]),
])
def test_stopped_worker_fails_the_job_within_the_timeout_naming_stage_and_rank(name, overrides, tmp_path):
    """SIGSTOP rank 1 mid-run: rank 0 reports within the timeout; torchrun exits non-zero instead of hanging."""
    run_dir = tmp_path / "run"
    job = start(["model=mlp", "trainer.max_steps=100000", "trainer.log_every=5", "trainer.eval_every=0",
               "trainer.checkpoint_every=0", f"trainer.timeout_s={HUNG_TIMEOUT_S}", *overrides,
               f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    wait_for_step(run_dir, 20, job)
    stopped_pid = job.worker_pids()[1]
    stopped_at = time.monotonic()
    os.kill(stopped_pid, signal.SIGSTOP)
    try:
        reported_at, line = job.wait_for_line(r"^error: .*collective failed", after=stopped_at, timeout_s=60)
    finally:
        os.kill(stopped_pid, signal.SIGKILL)  # torchrun would SIGKILL it itself after its 30 s SIGTERM grace
    killed_at = time.monotonic()
    rc = job.wait(timeout_s=60)
    exited_s = time.monotonic() - killed_at
    match = re.search(r"collective failed in stage '([^']+)' \((world|intra-node|inter-node)\) on rank 0 of 2", line)
    assert match, line
    assert "Timed out" in line or "timed out" in line.lower(), line
    reported_s = reported_at - stopped_at
    assert reported_s < HUNG_TIMEOUT_S + 5, (reported_s, line)
    assert rc != 0 and exited_s < 20, (rc, exited_s)
    assert not (run_dir / "summary.json").exists()
    record(f"worker SIGSTOP (hung peer, {name})", detected_s=round(reported_s, 2), timeout_s=HUNG_TIMEOUT_S,
           stage=match.group(1), where=match.group(2), torchrun_rc=rc, torchrun_exit_after_kill_s=round(exited_s, 2))


# -- 3. non-finite gradients -------------------------------------------------------------


def _last_param_name(model_cfg: str) -> str:
    from omegaconf import OmegaConf

    from dist_supernet.models import build_model

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{model_cfg}.yaml"))
    return list(build_model(cfg, in_channels=1, image_size=8, num_classes=10).named_parameters())[-1][0]


NAN = ["model=mlp", "trainer.max_steps=12", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=20",
       "trainer.log_every=1", "trainer.eval_every=0", "trainer.max_consecutive_skips=3"]


def test_nan_on_one_rank_skips_on_every_rank_and_stops_after_the_limit_birder(tmp_path):
    """Birder (1-bit hook): NaN on rank 1 at steps 3, 6, 7, 8; x unchanged, the NaN never enters m, b; stop at 8."""
    run_dir = tmp_path / "run"
    started = time.monotonic()
    job = start([*NAN, "trainer.inject_nan_at_steps=[3,6,7,8]", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    rc = job.wait()
    name = _last_param_name("mlp")
    errors = [line for line in job.text.splitlines() if line.startswith("error:")]
    expected = (f"error: step 8: non-finite gradient in 3 consecutive steps (trainer.max_consecutive_skips=3), "
                f"first offending parameter {name} (1 of 6 parameters non-finite); stopping")
    assert rc != 0 and errors and set(errors) == {expected}, job.text[-3000:]
    assert not re.search(r'File ".*dist_supernet', job.text), "a traceback from our code"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 2, 3]
    ckpt = {s: load(run_dir / "checkpoints" / f"step_{s:08d}") for s in (2, 3, 4, 5, 6, 7)}
    for before, skipped in ((2, 3), (5, 6), (5, 7)):
        assert same_tensors(ckpt[before]["model"], ckpt[skipped]["model"])  # x unchanged
        # Birder's guarantee (issue 9): the non-finite element (element 0 of the last parameter's gradient on
        # rank 1) never enters m, b; the finite elements of the step do. Each rank saved its own m, b.
        last = next(reversed(ckpt[before]["model"].values())).numel()
        for r in (0, 1):
            for k in ("m", "b"):
                old, new = ckpt[before][f"rank0000{r}"]["optimizer"][k], ckpt[skipped][f"rank0000{r}"]["optimizer"][k]
                assert bool(torch.isfinite(new).all())
                if r == 1:
                    assert torch.equal(old[-last], new[-last])
    assert not same_tensors(ckpt[3]["model"], ckpt[4]["model"])  # and training goes on after a skip
    injected_at, _ = job.wait_for_line(r"inject_nan_at_steps: NaN .* at step 3 ")
    skip_at, _ = job.wait_for_line(r"step 3: non-finite gradient on some rank")
    last_injected_at, _ = job.wait_for_line(r"inject_nan_at_steps: NaN .* at step 8 ")
    stopped_at, _ = job.wait_for_line(r"^error: step 8")
    record("NaN on one rank (Birder)", detected_s=round(skip_at - injected_at, 3),
           stopped_s=round(stopped_at - last_injected_at, 3), run_s=round(time.monotonic() - started, 1))


def test_nan_on_one_rank_skips_the_step_for_adamw_too_and_replicas_stay_identical(tmp_path):
    """AdamW on DDP's fp32 all-reduce: the averaged gradient is NaN on every rank, so each skips locally."""
    run_dir = tmp_path / "run"
    job = start([*NAN, "compression=none", "optim=adamw", "trainer.inject_nan_at_steps=[3,6,7]",
               f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert job.wait() == 0, job.text[-3000:]
    summary, rows = read_run(run_dir)
    assert summary["params_in_sync"] and summary["skipped_steps"] == 3 and summary["steps"] == 12
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3]
    name = _last_param_name("mlp")
    skips = [line for line in job.text.splitlines() if "optimizer step skipped on every rank" in line]
    assert len(skips) == 3 and all(f"first offending parameter {name} (1 of 6" in s for s in skips), skips
    ckpt = {s: load(run_dir / "checkpoints" / f"step_{s:08d}") for s in (2, 3, 4)}
    assert same_tensors(ckpt[2]["model"], ckpt[3]["model"])  # parameters unchanged
    assert same_tensors(ckpt[2]["optimizer"]["state"], ckpt[3]["optimizer"]["state"])  # Adam moments unchanged
    assert not same_tensors(ckpt[3]["model"], ckpt[4]["model"])


# -- 5. a changed world size -------------------------------------------------------------


def _fallback_lines(text: str, old: int, new: int) -> list[str]:
    return [line for line in text.splitlines() if f"written by {old} ranks, this job has {new}" in line]


def test_resume_a_two_rank_checkpoint_on_four_ranks(reference, tmp_path):
    run_dir = tmp_path / "run"
    ckpt = reference / "checkpoints" / "step_00000020"
    out = run_once(["model=mlp", "trainer.max_steps=26", "trainer.log_every=1", f"trainer.resume={ckpt}",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path, nproc=4)
    text = out.stdout + out.stderr
    (line,) = _fallback_lines(text, 2, 4)  # one line, from rank 0 (the others' go to their log files)
    assert "Birder: checkpoint holds m, b of 2 ranks, this job has 4: every rank starts from their mean" in line
    summary, rows = read_run(run_dir)
    assert (summary["world_size"], summary["resumed_from_step"], summary["steps"]) == (4, 20, 26)
    assert summary["params_in_sync"]
    assert [r["step"] for r in rows] == list(range(21, 27))  # a new run directory: rows from the resume on
    assert all(_fallback_lines((run_dir / f"train_rank{r}.log").read_text(), 2, 4) for r in range(4))


def test_resume_a_two_rank_checkpoint_on_one_process(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", tmp_path / "ckpts")
    out = run_once(["model=mlp", "trainer.max_steps=44", "trainer.log_every=1",
                    f"trainer.checkpoint_dir={tmp_path / 'ckpts'}", f"hydra.run.dir={run_dir}"], cwd=tmp_path, nproc=1)
    (line,) = _fallback_lines(out.stdout + out.stderr, 2, 1)
    assert "Birder: checkpoint holds m, b of 2 ranks, this job has 1" in line
    summary, _ = read_run(run_dir)
    assert (summary["world_size"], summary["resumed_from_step"], summary["steps"]) == (1, 40, 44)


# -- 6. untrusted files --------------------------------------------------------------------


def test_a_checkpoint_of_another_model_fails_before_training_naming_the_first_key(reference, tmp_path):
    ckpt = reference / "checkpoints" / "step_00000040"
    run_dir = tmp_path / "run"
    started = time.monotonic()
    out = run_once(["model=cnn", f"trainer.resume={ckpt}", f"hydra.run.dir={run_dir}"], cwd=tmp_path, nproc=1,
                   check=False)
    elapsed = time.monotonic() - started
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stdout[-3000:]
    assert errors[0].startswith(f"error: trainer.resume={ckpt}: step_00000040 is from a different model "
                                "(saved with model=mlp, this run has model=cnn): first mismatched key "), errors
    assert "Traceback" not in out.stdout and not (run_dir / "metrics.jsonl").exists()
    record("checkpoint of another model", detected_s=round(elapsed, 1), note="whole process, start to exit 2")


def test_a_checkpoint_of_another_recipe_fails_before_training_unless_only_its_weights_are_asked_for(reference,
                                                                                                    tmp_path):
    """Issue 13: a Birder checkpoint resumed with compression=fp16 used to exit 0 with two different models."""
    ckpt = reference / "checkpoints" / "step_00000040"
    # Two spawns; every other key (the collective, lr, ...) takes the same path (unit test: test_checkpoint_files).
    for overrides, key, values in [(["compression=fp16"], "compression.name", "birder in the checkpoint, fp16"),
                                   (["compression=none", "optim=adamw"], "optim.name", "birder in the checkpoint, adamw")]:
        run_dir = tmp_path / key
        started = time.monotonic()
        out = run_once(["model=mlp", *overrides, f"trainer.resume={ckpt}", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                       nproc=1, check=False)
        errors = [line for line in out.stdout.splitlines() if line.startswith("error:")]
        assert out.returncode == 2 and errors == [
            f"error: trainer.resume={ckpt}: step_00000040 was written with another recipe: first differing key {key} "
            f"({values} in this run); trainer.resume_weights_only=true loads only its model weights"], out.stdout[-3000:]
        assert not (run_dir / "metrics.jsonl").exists()
    record("checkpoint of another recipe", detected_s=round(time.monotonic() - started, 1),
           note="whole process, start to exit 2")
    # The documented override: the weights, nothing else (a fresh optimizer, schedule and step count).
    run_dir = tmp_path / "weights_only"
    out = run_once(["model=mlp", "compression=fp16", "trainer.max_steps=3", "trainer.log_every=1",
                    f"trainer.resume={ckpt}", "trainer.resume_weights_only=true", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path, nproc=1)
    assert "trainer.resume_weights_only=true: loaded the model weights of" in out.stdout
    summary, rows = read_run(run_dir)
    assert summary["resumed_from_step"] is None and [r["step"] for r in rows] == [1, 2, 3]
    _, reference_rows = read_run(reference)
    fresh, trained = reference_rows[0]["loss"], reference_rows[-1]["loss"]
    assert rows[0]["loss"] < fresh - (fresh - trained) / 2  # it starts from the trained weights


# -- issue 22: nothing lost, nothing silently wrong ------------------------------------------


def _errors(text: str) -> set[str]:
    return {line for line in text.splitlines() if line.startswith("error:")}


def test_a_checkpoint_without_manifest_is_checked_against_its_own_files_before_resuming(reference, tmp_path):
    """The issue's reproduction: step 30 copied without manifest.json, resumed with compression=fp16 on 2 ranks,
    used to load each rank's own Birder m, b into a rank-independent Birder: exit 0, params in sync: False."""
    ckpts = tmp_path / "y" / "checkpoints"
    shutil.copytree(reference / "checkpoints" / "step_00000030", ckpts / "step_00000030")
    (ckpts / "step_00000030" / "manifest.json").unlink()
    out = run_once(["model=mlp", "trainer.max_steps=40", "compression=fp16", f"hydra.run.dir={tmp_path / 'y'}"],
                   cwd=tmp_path, check=False)
    assert out.returncode != 0 and _errors(out.stdout) == {
        "error: trainer.resume=auto: step_00000030 holds Birder m, b that differ between ranks (written by the 1-bit "
        "exchange, compression=birder); this run has compression=fp16, whose Birder steps on the averaged gradient "
        "and needs the same m, b on every rank: resume with compression=birder, or trainer.resume_weights_only=true"
    }, out.stdout[-3000:]
    assert not (tmp_path / "y" / "metrics.jsonl").exists() and not re.search(r'File ".*dist_supernet', out.stdout)


def test_replicas_that_drift_apart_stop_the_job_naming_step_and_parameter(tmp_path):
    """One element of rank 1's last parameter moved after step 5: the periodic check (every 3 steps) stops the
    job at step 6, naming the parameter and the last step they were equal; no later checkpoint is written."""
    run_dir = tmp_path / "run"
    started = time.monotonic()
    out = run_once(["model=mlp", "trainer.max_steps=12", "trainer.checkpoint_every=4", "trainer.sync_check_every=3",
                    "trainer.log_every=1", "trainer.eval_every=0", "trainer.inject_divergence_at_step=5",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path, check=False)
    name = _last_param_name("mlp")
    assert out.returncode == 1 and _errors(out.stdout) == {
        f"error: step 6: the replicas differ: first differing parameter {name} (rank 0 vs rank 1; 1 of 6 parameters "
        "differ; equal at step 4, the previous check); stopping before another checkpoint is written"
    }, out.stdout[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_00000004"]
    assert not (run_dir / "summary.json").exists()
    record("replicas apart in one element (rank 1, after step 5)", detected_at_step=6, check_every=3,
           run_s=round(time.monotonic() - started, 1))


def _mount_tmpfs(path: Path, size_kib: int) -> bool:
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_and_leaves_no_temporary_and_the_older_checkpoints(reference, tmp_path):
    """A real full filesystem: a tmpfs with room for two and a half checkpoints of the reference run's size.

    Without root (no tmpfs), the write layer's ENOSPC is injected in tests/unit/test_checkpoint_files.py.
    """
    size = sum(p.stat().st_size for p in (reference / "checkpoints" / "step_00000040").iterdir())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, size * 5 // 2 // 1024):
        pytest.skip("mounting a tmpfs needs root; the ENOSPC path is tested by injection in test_checkpoint_files")
    try:
        out = run_once(["model=mlp", "trainer.max_steps=20", "trainer.checkpoint_every=5", "trainer.eval_every=0",
                        f"trainer.checkpoint_dir={disk / 'ck'}", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, check=False)
        (error,) = _errors(out.stdout)  # every rank prints the same line
        assert out.returncode == 1 and re.match(
            rf"error: checkpoint step_00000015 could not be written: ENOSPC \(no space left on device\) in {disk / 'ck'}: "
            r"the last checkpoint took \d+\.\d KiB, \d+(\.\d KiB| bytes) free; this job's temporary \.step_00000015\.tmp-"
            r"\S+ removed, the older checkpoints are intact \(step_00000005, step_00000010\)$", error), error
        assert not re.search(r'File ".*dist_supernet', out.stdout)  # no traceback from our code (torchrun's own stays)
        assert sorted(p.name for p in (disk / "ck").iterdir()) == ["run.lock", "step_00000005", "step_00000010"]
        for step in (5, 10):
            load(disk / "ck" / f"step_{step:08d}")  # intact: digests match
        record("disk full (tmpfs) at the third checkpoint", checkpoint_bytes=size, older_checkpoints_intact=2)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
