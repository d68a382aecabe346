"""Sweeps end to end: a Hydra multirun whose jobs are real torchrun jobs (2 gloo processes each).

Every torchrun start costs seconds on 2 cores, so the sweep runs two tiny jobs
(3 steps of the MLP on digits) and two that the config check rejects before
launch; a second sweep has only jobs that the check rejects for a model.* and a
supernet.* value; a last test drives one job to a crash and one to the timeout.
"""

import csv
import subprocess
import sys
import time

from dist_supernet.sweep.jobs import JobRecord, run_job
from tests.distributed.jobs import REPO, env, run

TIMEOUT_S = 240


def test_sweep_runs_every_job_reports_failures_and_writes_the_table(tmp_path):
    """compression=none,birder x optim.lr=0.01,-1: two jobs train, the lr=-1 jobs are marked invalid, table + plots."""
    sweep_dir = tmp_path / "sweep"
    out = run(
        [sys.executable, "-m", "dist_supernet.sweep", "model=mlp", "trainer.max_steps=3", "trainer.eval_every=0",
         "trainer.checkpoint_every=0", "compression=none,birder", "optim.lr=0.01,-1", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, timeout_s=TIMEOUT_S)
    # Invalid jobs do not stop the sweep; it writes the whole table, then exits 1 (issue 22: it exited 0).
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 ok, 0 failed, 2 invalid" in out.stdout + out.stderr

    with open(sweep_dir / "sweep_summary.csv") as f:
        rows = {(r["compression"], r["optim.lr"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("none", "0.01"), ("none", "-1"), ("birder", "0.01"), ("birder", "-1")}
    for compression in ("none", "birder"):
        ok, bad = rows[(compression, "0.01")], rows[(compression, "-1")]
        assert ok["status"] == "ok" and 0 <= float(ok["eval_accuracy"]) <= 1 and float(ok["final_loss"]) > 0
        assert float(ok["median_step_s"]) > 0 and float(ok["job_time_s"]) >= float(ok["train_time_s"]) > 0
        assert bad["status"] == "invalid" and bad["reason"] == "optim.lr=-1: must be > 0"
        assert not (sweep_dir / bad["job"] / "torchrun.log").exists()  # rejected before launch
        job_dir = sweep_dir / ok["job"]
        record = JobRecord.load(job_dir)
        assert record.returncode == 0 and "--standalone" in record.command
        assert f"hydra.run.dir={job_dir}" in record.command
        assert "trainer.log_every=1" in record.overrides  # the launcher's job default: a metrics row per step
        assert (job_dir / "summary.json").is_file() and len((job_dir / "metrics.jsonl").read_text().splitlines()) == 3
    # 1 bit per element against DDP's fp32: Birder's bytes per step are far below
    assert float(rows[("birder", "0.01")]["bytes_per_step"]) * 10 < float(rows[("none", "0.01")]["bytes_per_step"])
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "4 jobs: 2 ok, 0 failed, 2 invalid" in md and "| compression | optim.lr |" in md
    for png in ("loss_vs_step.png", "loss_vs_time.png"):
        assert (sweep_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_bad_supernet_and_model_values_are_invalid_jobs_never_launched(tmp_path):
    """The launcher's check is the app's own pass: a model.* and a supernet.* mistake are ``invalid``, not ``failed``.

    ``++model.patch_size=2`` is a ViT key: ofa_cnn refuses it (model.*); elastic_vit takes it and then
    refuses progressive_ofa's ofa_cnn-only phases (supernet.*). Neither job starts torchrun.
    """
    sweep_dir = tmp_path / "sweep"
    out = run(
        [sys.executable, "-m", "dist_supernet.sweep", "model=ofa_cnn,elastic_vit", "supernet=progressive_ofa",
         "++model.patch_size=2", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, timeout_s=TIMEOUT_S)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 ok, 0 failed, 2 invalid" in out.stdout + out.stderr  # the table's line, before the exit
    with open(sweep_dir / "sweep_summary.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert {model: row["status"] for model, row in rows.items()} == {"ofa_cnn": "invalid", "elastic_vit": "invalid"}
    assert rows["ofa_cnn"]["reason"].startswith("model.patch_size=2: unknown key for ofa_cnn; expected ")
    assert rows["elastic_vit"]["reason"].startswith(
        "supernet.progressive_shrinking[0].elastic=[kernel]: unknown kernel; expected a subset of ")
    for row in rows.values():
        record = JobRecord.load(sweep_dir / row["job"])
        assert record.command == [] and record.returncode is None  # rejected before launch
        assert not (sweep_dir / row["job"] / "torchrun.log").exists()


def test_run_job_records_a_crash_and_kills_a_job_at_its_timeout(tmp_path, monkeypatch):
    """A job that fails after launch gets its one-line reason from the log; a hung one is killed, workers too."""
    for key, value in env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    crashed = run_job(0, ["model=mlp", "trainer.batch_size=5000"], tmp_path / "0", nproc_per_node=1, timeout_s=120)
    assert (crashed.status, crashed.returncode) == ("failed", 1)
    assert crashed.reason.startswith("exit 1: trainer.batch_size=5000: larger than each rank's shard")
    assert JobRecord.load(tmp_path / "0") == crashed

    start = time.perf_counter()
    hung = run_job(1, ["model=mlp", "trainer.max_steps=1000000"], tmp_path / "1", nproc_per_node=1, timeout_s=4)
    assert time.perf_counter() - start < 4 + 15
    assert (hung.status, hung.returncode) == ("failed", None) and hung.reason.startswith("timed out after 4 s")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"hydra.run.dir={tmp_path / '1'}" not in ps  # torchrun and its worker are gone
