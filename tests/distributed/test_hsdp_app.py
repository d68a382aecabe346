"""The training application under ``trainer.parallelism=hsdp``: real torchrun, 2 pretend nodes.

One 4-process run (2 nodes x 2 ranks) with Birder's 1-bit exchange across nodes and a checkpoint
every 5 steps; a second job resumes its step-10 checkpoint and must end bit-identical; a third resumes
it on another mesh (2 nodes x 1); a fourth runs FSDP's native fp32 HSDP (the baseline) on 2 nodes x 1.
"""

import json
import shutil

from tests.distributed.jobs import read_run, run, torchrun

HSDP = ["model=mlp", "trainer.parallelism=hsdp", "compression.num_nodes=2", "trainer.max_steps=15",
        "trainer.checkpoint_every=5", "trainer.log_every=5", "trainer.eval_every=0"]


def test_hsdp_trains_resumes_bit_identically_and_runs_the_native_baseline(tmp_path):
    ref = tmp_path / "ref"
    run(torchrun(*HSDP, f"hydra.run.dir={ref}", nproc=4), cwd=tmp_path, check=True)
    summary, rows = read_run(ref)
    assert summary["params_in_sync"] is True and summary["parallelism"] == "hsdp"
    assert summary["collective"] == "allgather" and summary["world_size"] == 4 and summary["num_nodes"] == 2
    assert rows[-1]["loss"] < rows[0]["loss"]
    # 1 bit per element across nodes: each rank's shard (1/2 of the model) at 1 bit, 15 steps, plus flags.
    shard_bits = summary["num_params"] / 2
    assert summary["bytes_inter_total"] < 4 * 15 * (shard_bits / 8 + 64)
    manifest = json.loads((ref / "checkpoints" / "step_00000010" / "manifest.json").read_text())
    assert manifest["mesh"] == [2, 2]

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_00000010", resumed / "checkpoints" / "step_00000010")
    log = run(torchrun(*HSDP, f"hydra.run.dir={resumed}", nproc=4), cwd=tmp_path, check=True)
    again, _ = read_run(resumed)
    assert again["resumed_from_step"] == 10, log
    assert again["params_sha256"] == summary["params_sha256"] and again["final_loss"] == summary["final_loss"]

    # Another mesh (2 nodes x 1): each replica's m, b resharded and averaged, said in one line.
    other = tmp_path / "other_mesh"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_00000010", other / "checkpoints" / "step_00000010")
    log = run(torchrun(*HSDP, f"hydra.run.dir={other}", nproc=2), cwd=tmp_path, check=True)
    moved, _ = read_run(other)
    assert moved["resumed_from_step"] == 10 and moved["params_in_sync"] is True
    assert "this job's mesh is [2, 1]: every rank starts from their mean, resharded" in log.stdout + log.stderr

    native = tmp_path / "native"
    run(torchrun(*HSDP, "compression=none", "optim=adamw", "trainer.max_steps=6", f"hydra.run.dir={native}",
                 nproc=2), cwd=tmp_path, check=True)
    base, _ = read_run(native)
    assert base["params_in_sync"] is True and base["compression"] == "none" and base["num_nodes"] == 2
    # Across nodes, per step and per element of a rank's shard: >= 28x fewer bytes than native fp32 HSDP.
    per_element = {name: s["bytes_inter_total"] / s["steps"] / s["world_size"] / (s["num_params"] * s["num_nodes"]
                                                                                  / s["world_size"])
                   for name, s in (("birder", summary), ("native", base))}
    assert per_element["birder"] * 28 <= per_element["native"], per_element
