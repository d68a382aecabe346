"""The training application end to end: real torchrun, 2 gloo processes on loopback.

Each spawn costs seconds on 2 cores, so each test checks many things per run:
files and keys, replicas in sync, byte counts, resume. Runs are tiny (digits,
MLP, <= 14 steps).
"""

import json
import re
import socket
from pathlib import Path

import pytest
import torch

from dist_supernet.train.checkpoint import read_checkpoint
from dist_supernet.train.untrusted import load_dcp_metadata
from tests.distributed.jobs import REPO, launcher, read_run, read_scalars, run, single, torchrun

SUMMARY_KEYS = {"final_loss", "eval_accuracy", "steps", "world_size", "compression", "collective",
                "bytes_sent_total", "params_in_sync", "params_sha256", "resumed_from_step"}
ROW_KEYS = {"step", "loss", "wall_time_s", "bytes_sent", "bytes_intra", "bytes_inter", "lr", "epoch"}
# metrics.jsonl key -> TensorBoard tag (trainer.tensorboard=auto writes them when tensorboard is installed)
TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "train_time_s": "train/train_time_s",
                    "skipped_steps": "train/skipped_steps", "bytes_sent": "comm/bytes_sent",
                    "bytes_intra": "comm/bytes_intra", "bytes_inter": "comm/bytes_inter", "val_loss": "val/loss",
                    "val_accuracy": "val/accuracy", "val_perplexity": "val/perplexity"}
# Small and fast: checkpoints every 4 steps, a metrics row every step.
# model=mlp: these tests are about the app's plumbing; the supernet main job has its own tests.
TINY = ["model=mlp", "trainer.max_steps=12", "trainer.checkpoint_every=4", "trainer.log_every=1", "trainer.eval_every=6"]


def check_tensorboard(run_dir: Path, rows: list[dict]) -> dict | None:
    """The event files hold the metrics rows' numbers, each step once (a resume's purge applied); None without
    tensorboard installed, where trainer.tensorboard=auto writes no event file."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not list(run_dir.glob("events.out.tfevents.*"))
        return None
    scalars = read_scalars(run_dir)
    for key, tag in TENSORBOARD_TAGS.items():
        expected = [(row["step"], pytest.approx(row[key], rel=1e-6, abs=1e-9)) for row in rows if key in row]
        assert scalars.get(tag, []) == expected, (tag, scalars.get(tag))
    # Seconds per step inside train_step since the previous row.
    previous = [{"step": 0, "train_time_s": 0.0}] + rows[:-1]
    step_times = [(b["step"], pytest.approx((b["train_time_s"] - a["train_time_s"]) / (b["step"] - a["step"]),
                                            rel=1e-5, abs=1e-9)) for a, b in zip(previous, rows)]
    assert scalars["train/step_time_s"] == step_times and all(t > 0 for _, t in scalars["train/step_time_s"])
    return scalars


def check_common(run_dir: Path, *, steps: int, compression: str, collective: str) -> tuple[dict, list[dict]]:
    """What every successful run must leave behind."""
    summary, rows = read_run(run_dir)
    assert SUMMARY_KEYS <= set(summary)
    assert (summary["steps"], summary["world_size"]) == (steps, 2)
    assert (summary["compression"], summary["collective"]) == (compression, collective)
    assert summary["params_in_sync"] is True
    assert 0 <= summary["eval_accuracy"] <= 1 and summary["final_loss"] > 0
    assert all(ROW_KEYS <= set(row) for row in rows)
    assert rows[-1]["step"] == steps and rows[-1]["loss"] == summary["final_loss"]
    assert summary["bytes_sent_total"] == rows[-1]["bytes_sent"] > 0
    assert summary["bytes_sent_total"] == sum(summary["bytes_sent_per_rank"])
    assert [r["bytes_sent"] for r in rows] == sorted(r["bytes_sent"] for r in rows)  # cumulative
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == len(rows) + 1
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "train_rank0.log").is_file() and (run_dir / "train_rank1.log").is_file()
    return summary, rows


@pytest.fixture(scope="module")
def birder_run(tmp_path_factory):
    """The default (Birder, collective=auto: allgather on 2 ranks) through launch/single_node.sh; the reference for resume."""
    run_dir = tmp_path_factory.mktemp("birder") / "run"
    run(launcher(*TINY, f"hydra.run.dir={run_dir}"), cwd=run_dir.parent, check=True)
    return run_dir


def test_default_birder_run(birder_run):
    summary, rows = check_common(birder_run, steps=12, compression="birder", collective="allgather")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["step"] for r in rows if "val_accuracy" in r] == [6, 12]
    assert summary["optimizer"] == "birder" and summary["resumed_from_step"] is None
    scalars = check_tensorboard(birder_run, rows)
    if scalars is not None:
        assert scalars["test/accuracy"] == [(12, pytest.approx(summary["test_accuracy"]))]
    # keep_checkpoints=3 of 4, 8, 12, one directory each (torch.distributed.checkpoint); manifests say
    # step, world size and the sha256 of every file
    manifests = sorted((birder_run / "checkpoints").glob("step_*/manifest.json"))
    assert [json.loads(m.read_text())["step"] for m in manifests] == [4, 8, 12]
    newest = birder_run / "checkpoints" / "step_00000012"
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and set(manifest["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    state = read_checkpoint(newest)  # digests checked, weights_only
    assert {"model", "scheduler", "sampler", "nonfinite", "progress", "rank00000", "rank00001"} <= set(state)
    assert {"optimizer", "rng", "comm_stats"} <= set(state["rank00001"])
    assert state["progress"]["step"] == 12 and manifest["config"]["model"]["name"] == "mlp"
    # Each rank wrote its own m, b (never gathered on one rank): T elements each, into its own file
    m = [state[f"rank0000{r}"]["optimizer"]["m"] for r in (0, 1)]
    assert all(x.shape == (summary["num_params"],) for x in m) and not torch.equal(*m)
    where = {i.fqn: s.relative_path for i, s in load_dcp_metadata(newest / ".metadata").storage_data.items()}
    assert (where["rank00000.optimizer.m"], where["rank00001.optimizer.b"]) == ("__0_0.distcp", "__1_0.distcp")


def test_restart_resumes_bit_identically_and_skips_a_corrupt_checkpoint(birder_run, tmp_path):
    """Rank 1 dies after step 9 of 12; torchrun --max-restarts=1 resumes from step 8 in the same directory.

    No hydra.run.dir: the default outputs/<stamp> must be one directory for both
    ranks and both attempts. Then the newest checkpoint is truncated and a
    longer run on a different world size resumes from the one before, saying so.
    """
    out = run(torchrun(*TINY, "trainer.crash_at_step=10", max_restarts=1), cwd=tmp_path, check=True)
    (run_dir,) = (tmp_path / "outputs").iterdir()
    summary, rows = check_common(run_dir, steps=12, compression="birder", collective="allgather")
    assert "crashing on purpose" in out.stdout + out.stderr
    assert summary["resumed_from_step"] == 8
    reference, reference_rows = read_run(birder_run)
    assert summary["params_sha256"] == reference["params_sha256"]  # bit-identical to the uninterrupted run
    timings = ("wall_time_s", "train_time_s")  # the only columns that differ
    assert rows == [dict(r, **{k: row[k] for k in timings}) for r, row in zip(reference_rows, rows)]
    assert summary["bytes_sent_total"] == reference["bytes_sent_total"]
    check_tensorboard(run_dir, rows)  # two event files, steps 9-10 of the first purged by the second

    # Truncate the newest checkpoint; resume on ONE process (no torchrun): the previous
    # checkpoint is used, each problem reported in one line, training goes on.
    with open(run_dir / "checkpoints" / "step_00000012" / "__1_0.distcp", "r+b") as f:
        f.truncate(1000)
    out = run(single("model=mlp", "trainer.max_steps=14", "trainer.log_every=1", f"hydra.run.dir={run_dir}"),
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (out.stdout + out.stderr).splitlines()  # Hydra logs to stdout, warnings.warn via logging
    unusable = [line for line in lines if "unusable" in line]
    assert len(unusable) == 1 and "step_00000012 is unusable: sha256 mismatch" in unusable[0], lines
    assert any("written by 2 ranks, this job has 1" in line for line in lines)
    assert any("Birder: checkpoint holds m, b of 2 ranks, this job has 1" in line for line in lines)
    summary, rows = read_run(run_dir)
    assert (summary["resumed_from_step"], summary["steps"], summary["world_size"]) == (8, 14, 1)
    assert [r["step"] for r in rows] == list(range(1, 15))  # rows after step 8 were rewritten
    check_tensorboard(run_dir, rows)  # and the events after step 8, from a third event file


@pytest.mark.parametrize("name, overrides", [
    # fp16 compress hook + SGD, 2 micro-batches per step under no_sync
    ("fp16", ["model=mlp", "compression=fp16", "optim=sgd", "trainer.grad_accum=2"]),
    # PowerSGD + Birder on the averaged gradient (rank-independent draws), CNN
    ("powersgd", ["compression=powersgd", "optim=birder", "model=cnn"]),
])
def test_baseline_compressions(name, overrides, tmp_path):
    run_dir = tmp_path / "run"
    run(torchrun(*overrides, "trainer.max_steps=6", "trainer.log_every=2", f"hydra.run.dir={run_dir}"), cwd=tmp_path,
        check=True)
    summary, _ = check_common(run_dir, steps=6, compression=name, collective="allreduce")
    assert summary["bytes_inter_total"] == 0  # one node
    if name == "fp16":
        # One all-reduce of 2-byte elements per step despite 2 micro-batches: a 2-rank ring
        # sends 2 * (2 - 1) / 2 * payload per rank.
        assert summary["bytes_sent_total"] == 6 * 2 * (2 * summary["num_params"])


def test_hierarchical_on_two_pretend_nodes_via_multi_node_script(tmp_path):
    """launch/multi_node.sh (c10d rendezvous, one real node) with the 1-bit hierarchical collective."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run(["bash", str(REPO / "launch" / "multi_node.sh"), "model=mlp", "compression.collective=hierarchical",
         "compression.num_nodes=2", "trainer.max_steps=6", "trainer.log_every=3"], cwd=tmp_path, check=True,
        NNODES="1", NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{port}", RUN_ID="hier", OUTPUT_ROOT=str(tmp_path),
        MAX_RESTARTS="0")
    summary, _ = check_common(tmp_path / "hier", steps=6, compression="birder", collective="hierarchical")
    assert summary["num_nodes"] == 2
    assert summary["bytes_inter_total"] > 0 and summary["bytes_intra_total"] == 0  # one rank per pretend node


@pytest.mark.parametrize("overrides, line", [
    (["optim.lr=-1.0"], "error: optim.lr=-1.0: must be > 0"),
    (["compression.collective=hierarchical", "compression.num_nodes=3"],
     "error: compression.num_nodes=3: must divide the world size 2"),
])
def test_bad_input_fails_at_start_with_one_line(overrides, line, tmp_path):
    out = run(torchrun(*overrides, f"hydra.run.dir={tmp_path / 'run'}"), cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    errors = [x for x in text.splitlines() if x.startswith("error:")]
    assert errors and set(errors) == {line}, text[-3000:]  # each rank that got to print said the same line
    assert not re.search(r'File ".*dist_supernet', text), "a traceback from our code"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
