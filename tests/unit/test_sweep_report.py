"""The sweep's bookkeeping without processes: the table and plots from fake job dirs, override handling,
failure reasons, and every experiment preset in conf/experiment/ composing and validating."""

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dist_supernet.sweep.jobs import JobRecord, failure_reason, with_defaults
from dist_supernet.sweep.report import collect, median_step_time, running_mean, split_overrides, write_report
from dist_supernet.train.config import register_resolvers, validate
from tests.configs import compose_train

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _fake_job(sweep_dir: Path, num: int, overrides: list[str], status: str, *, step_s: float = 0.01,
              bytes_per_step: int = 0, reason: str = "", steps: int = 5) -> None:
    """A job dir as the launcher and a 2-rank training run leave it."""
    job_dir = sweep_dir / str(num)
    JobRecord(num=num, overrides=overrides, status=status, reason=reason,
              returncode=None if status == "invalid" else (0 if status == "ok" else 1),
              job_time_s=0.0 if status == "invalid" else 9.5).save(job_dir)
    if status == "invalid":
        return
    # step 1 took 1 s (DDP set-up), then step_s per step; bytes are cumulative over both ranks
    rows = [{"step": s, "loss": 2.0 / s, "wall_time_s": 1.0 + (s - 1) * step_s, "bytes_sent": 2 * bytes_per_step * s}
            for s in range(1, steps + 1)]
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status == "ok":
        summary = {"final_loss": rows[-1]["loss"], "eval_loss": 0.5, "eval_accuracy": 0.9 + num / 100, "steps": steps,
                   "world_size": 2, "bytes_sent_total": rows[-1]["bytes_sent"], "wall_time_s": rows[-1]["wall_time_s"]}
        (job_dir / "summary.json").write_text(json.dumps(summary))


def test_table_and_plots_from_job_dirs(tmp_path):
    _fake_job(tmp_path, 0, ["model=mlp", "compression=none", "optim.lr=0.01"], "ok", step_s=0.02, bytes_per_step=68904)
    _fake_job(tmp_path, 1, ["model=mlp", "compression=none", "optim.lr=-1"], "invalid",
              reason="optim.lr=-1: must be > 0")
    _fake_job(tmp_path, 2, ["model=mlp", "compression=birder", "optim.lr=0.01"], "ok", step_s=0.03,
              bytes_per_step=3231)
    _fake_job(tmp_path, 3, ["model=mlp", "compression=birder", "optim.lr=0.1"], "failed", steps=3,
              reason="exit 1: RuntimeError: boom")
    (tmp_path / "multirun.yaml").write_text("")  # Hydra's own file: not a job

    paths = write_report(tmp_path)

    assert sorted(p.name for p in paths) == ["loss_vs_step.png", "loss_vs_time.png", "sweep_summary.csv",
                                             "sweep_summary.md"]
    for png in ("loss_vs_step.png", "loss_vs_time.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    # varied overrides only (model=mlp is shared), then the metrics, then why
    assert list(rows[0]) == ["job", "status", "compression", "optim.lr", "final_loss", "eval_loss", "eval_accuracy",
                             "bytes_per_step", "median_step_s", "train_time_s", "job_time_s", "reason"]
    assert [(r["job"], r["status"], r["compression"], r["optim.lr"]) for r in rows] == [
        ("0", "ok", "none", "0.01"), ("1", "invalid", "none", "-1"), ("2", "ok", "birder", "0.01"),
        ("3", "failed", "birder", "0.1")]
    ok = rows[0]
    assert float(ok["bytes_per_step"]) == 68904  # total / steps / world_size
    assert float(ok["median_step_s"]) == pytest.approx(0.02)  # the 1 s first step does not count
    assert float(ok["final_loss"]) == pytest.approx(0.4) and float(ok["eval_accuracy"]) == pytest.approx(0.9)
    assert (float(ok["train_time_s"]), float(ok["job_time_s"])) == (pytest.approx(1.08), 9.5)
    assert rows[1]["reason"] == "optim.lr=-1: must be > 0" and rows[1]["final_loss"] == rows[1]["job_time_s"] == ""
    assert rows[3]["reason"] == "exit 1: RuntimeError: boom" and rows[3]["eval_accuracy"] == ""
    assert float(rows[3]["median_step_s"]) == pytest.approx(0.01)  # partial metrics of a failed job still count

    md = (tmp_path / "sweep_summary.md").read_text()
    assert "4 jobs: 2 ok, 1 failed, 1 invalid. Overrides shared by every job: `model=mlp`." in md
    assert "| 0 | ok | none | 0.01 | 0.4000 | 0.5000 | 90.00% | 68,904 | 20.0 | 1.08 | 9.50 |  |" in md
    assert "| 1 | invalid | none | -1 | – | – | – | – | – | – | – | optim.lr=-1: must be > 0 |" in md
    assert "![loss vs step](loss_vs_step.png)" in md


def test_overrides_split_into_varied_and_shared(tmp_path):
    _fake_job(tmp_path, 0, ["model=mlp", "experiment=fp32_adamw", "optim.lr=0.001"], "invalid")
    _fake_job(tmp_path, 1, ["model=mlp", "experiment=birder_two_phase", "+trainer.seed=1"], "invalid")
    varied, common = split_overrides(collect(tmp_path))
    assert varied == ["experiment", "optim.lr", "trainer.seed"]  # a key one job leaves at its default varies
    assert common == {"model": "mlp"}
    md = write_report(tmp_path)[0].read_text()
    assert "| 1 | invalid | birder_two_phase | (default) | 1 |" in md


def test_median_step_time_and_running_mean():
    rows = [{"step": 10, "wall_time_s": 1.0}, {"step": 20, "wall_time_s": 2.0}, {"step": 30, "wall_time_s": 4.0},
            {"step": 40, "wall_time_s": 4.5}]
    assert median_step_time(rows) == pytest.approx(0.1)  # log_every=10: per-step from each row gap
    assert median_step_time(rows[:1]) is None
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_failure_reason_and_job_defaults():
    log = "W... noise\nerror: trainer.batch_size=5000: larger than each rank's shard\n" * 2 + "ChildFailedError:\n"
    assert failure_reason(log, 1) == "exit 1: trainer.batch_size=5000: larger than each rank's shard"
    traceback = ("Traceback (most recent call last):\n  File 'x'\nRuntimeError: Connection closed by peer\n"
                 "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
    assert failure_reason(traceback, 1) == "exit 1: RuntimeError: Connection closed by peer"
    assert failure_reason("Killed\n", -9) == "exit -9: see torchrun.log"
    assert with_defaults(["+trainer.log_every=5", "x=1"], ["trainer.log_every=1"]) == ["+trainer.log_every=5", "x=1"]
    assert with_defaults(["x=1"], ["trainer.log_every=1"]) == ["trainer.log_every=1", "x=1"]


WORKLOAD_PRESETS = ("gpt_small", "elastic_gpt_small")  # a model, its data and its budget (and recipe)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                                        if p.stem not in WORKLOAD_PRESETS))
def test_experiment_presets_compose_and_validate(name):
    """Each preset pins the compression (and collective) and the optimizer its name says, nothing else."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}", "model=mlp"], return_hydra_config=True)
        plain = compose("train", overrides=["model=mlp"])
    run = validate(cfg)
    compression, optim = name.split("_", 1)
    if compression == "birder":
        assert (run.compression.name, run.optim.name, run.compression.collective) == ("birder", "birder", optim)
    else:
        assert (run.compression.name, run.optim.name) == ({"fp32": "none"}.get(compression, compression), optim)
    assert cfg.trainer == plain.trainer and cfg.data == plain.data and cfg.model == plain.model
    assert cfg.hydra.launcher._target_.endswith("TorchrunLauncher")  # every multirun is torchrun jobs


def test_the_small_gpt_preset_is_a_workload_any_compression_runs_on(tmp_path):
    from dist_supernet.train.preflight import check_config

    plain = compose_train()
    for extra in ([], ["compression=none", "optim=adamw"], ["compression=powersgd", "optim=adamw"]):
        cfg = compose_train("experiment=gpt_small", *extra)
        checked = check_config(cfg, tmp_path / "run", world_size=2)
        assert (checked.data.kind, checked.cfg.model["name"], checked.cfg.trainer.max_steps) == ("text", "gpt", 600)
        assert 0.8e6 < sum(p.numel() for p in checked.model.parameters()) < 0.85e6
        if not extra:
            assert cfg.compression == plain.compression and cfg.optim == plain.optim
