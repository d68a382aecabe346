"""A plugin's toy collective and toy baseline, end to end: one sweep, two real torchrun jobs (2 gloo ranks each).

``plugins=[tests.toy_plugin]`` is all the app needs: the sweep's pre-check, every torchrun
worker and the trainer import it and read the registries. The toy baseline's yaml comes from
an extra config dir on ``hydra.searchpath``, the way a user ships one outside this repository.
One sweep launches both jobs, so the start-up costs are paid once where they can be.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
NUM_CHUNKS = 3


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "DIST_SUPERNET_"))}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def test_a_plugin_collective_and_baseline_train_in_a_sweep(tmp_path):
    conf = tmp_path / "conf" / "compression"
    conf.mkdir(parents=True)
    (conf / "toy_chunked.yaml").write_text(
        f"name: toy_chunked\ncollective: allreduce\nnum_nodes: null\nnum_chunks: {NUM_CHUNKS}\n")
    (conf / "birder_toy.yaml").write_text("defaults:\n  - birder\n  - _self_\ncollective: toy_count_allreduce\n")
    sweep_dir = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "dist_supernet.sweep", "model=mlp", "trainer.max_steps=3", "trainer.eval_every=0",
         "trainer.checkpoint_every=0", "plugins=[tests.toy_plugin]", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
         "compression=toy_chunked,birder_toy", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 ok, 0 failed, 0 invalid" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]

    with open(sweep_dir / "sweep_summary.csv") as f:
        rows = {r["compression"]: r for r in csv.DictReader(f)}
    summaries = {name: json.loads((sweep_dir / row["job"] / "summary.json").read_text()) for name, row in rows.items()}
    for name, summary in summaries.items():
        assert summary["steps"] == 3 and summary["world_size"] == 2 and summary["params_in_sync"] is True, name
    toy_base, toy_coll = summaries["toy_chunked"], summaries["birder_toy"]
    assert (toy_base["compression"], toy_base["collective"]) == ("toy_chunked", "allreduce")
    assert (toy_coll["compression"], toy_coll["collective"]) == ("birder", "toy_count_allreduce")
    # The job recorded the baseline's own key; the bytes are each toy's wire model: a ring all-reduce
    # of 4 bytes per element (2 ranks: 4 bytes per element per rank per step), plus Birder's small
    # flag exchanges for the collective.
    config = (sweep_dir / rows["toy_chunked"]["job"] / ".hydra" / "config.yaml").read_text()
    assert f"num_chunks: {NUM_CHUNKS}" in config and "- tests.toy_plugin" in config
    per_step = toy_base["num_params"] * 4 * 2  # both ranks
    assert toy_base["bytes_sent_total"] == 3 * per_step
    assert 3 * per_step <= toy_coll["bytes_sent_total"] < 3 * per_step * 1.01
