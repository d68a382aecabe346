"""model=gpt data=text on 2 real gloo processes: Birder 1-bit and DDP fp32 + AdamW learn, replicas stay
bit-identical, and a run resumed from its checkpoint ends bit-identical to the uninterrupted one.

One spawn, three trainers in a row on each rank (each its own process group and run directory), built from
the app's own config (conf/train.yaml with model=gpt data=text), so every check shares the processes' start-up.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests.distributed.harness import free_ports, run_workers
from tests.distributed.jobs import read_scalars

TINY_GPT = ["model=gpt", "data=text", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
            "trainer.batch_size=8", "trainer.max_steps=12", "trainer.log_every=1", "trainer.eval_every=6",
            "trainer.checkpoint_every=6", "trainer.resume=never", "data.eval_windows=16"]


def _gpt_worker(rank, world_size, root, ports):
    import os

    import torch.distributed as dist

    from dist_supernet.train.trainer import Trainer
    from tests.configs import compose_train

    dist.destroy_process_group()  # each trainer makes its own (env://), as under torchrun
    out = {}

    def train(name, port, *overrides):
        os.environ["MASTER_PORT"] = port
        trainer = Trainer(compose_train(*TINY_GPT, *overrides), output_dir=Path(root) / name)
        try:
            summary = trainer.fit()
            batches = trainer.sampler.state_dict()
        finally:
            trainer.close()
        rows = [json.loads(line) for line in (Path(root) / name / "metrics.jsonl").read_text().splitlines()]
        out[name] = {"summary": summary, "rows": rows, "batches": batches}

    train("birder", ports[0])
    resume_from = Path(root) / "birder" / "checkpoints" / "step_00000006"
    train("resumed", ports[1], f"trainer.resume={resume_from}")
    train("adamw", ports[2], "compression=none", "optim=adamw", "optim.lr=1e-2")  # a short run: a larger step
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[3]}", rank=rank, world_size=world_size)
    return out  # (the harness destroys the default group it finds)


def test_a_tiny_gpt_learns_on_two_ranks_with_birder_and_adamw_and_resumes_bit_identically(tmp_path):
    results = run_workers(_gpt_worker, 2, str(tmp_path), free_ports(4), timeout_s=300)
    rank0, rank1 = results
    for name in ("birder", "resumed", "adamw"):
        summary = rank0[name]["summary"]
        assert summary["params_in_sync"] and summary["params_sha256"] == rank1[name]["summary"]["params_sha256"]
        assert summary["eval_loss"] == rank1[name]["summary"]["eval_loss"]  # the fixed val set, all-reduced
        assert summary["eval_perplexity"] == math.exp(summary["eval_loss"]) and "eval_accuracy" not in summary
        assert summary["test_perplexity"] > 1 and summary["dataset"] == "text" and len(summary["data_sha256"]) == 64
        assert rank0[name]["batches"]["batch_index"] == 12  # the data's position, as the checkpoint holds it
    for name in ("birder", "adamw"):
        summary, rows = rank0[name]["summary"], rank0[name]["rows"]
        # from ln(vocab) ~ 4.7 at init: a character-level model learns the letter frequencies within 12 steps
        assert summary["eval_loss"] < rows[0]["loss"] - 0.5, (name, rows[0]["loss"], summary["eval_loss"])
        assert [r["step"] for r in rows if "val_perplexity" in r] == [6, 12]
        assert all(r["train_time_s"] <= r["wall_time_s"] for r in rows)
    if importlib.util.find_spec("tensorboard") is not None:  # trainer.tensorboard=auto: text metrics too
        scalars, rows = read_scalars(tmp_path / "birder"), rank0["birder"]["rows"]
        assert scalars["val/perplexity"] == [(r["step"], pytest.approx(r["val_perplexity"]))
                                             for r in rows if "val_perplexity" in r]
        assert scalars["test/perplexity"] == [(12, pytest.approx(rank0["birder"]["summary"]["test_perplexity"]))]
    birder, adamw = rank0["birder"]["summary"], rank0["adamw"]["summary"]
    assert (birder["compression"], birder["collective"], adamw["compression"]) == ("birder", "allgather", "none")
    assert birder["bytes_sent_total"] * 16 < adamw["bytes_sent_total"]  # 1 bit vs 32 (plus Birder's flags)
    # Resumed at step 6 of the Birder run: the same parameters, losses and bytes as the run that never stopped.
    resumed = rank0["resumed"]["summary"]
    assert resumed["resumed_from_step"] == 6 and resumed["params_sha256"] == birder["params_sha256"]
    assert resumed["eval_loss"] == birder["eval_loss"] and resumed["bytes_sent_total"] == birder["bytes_sent_total"]
    timings = ("wall_time_s", "train_time_s")
    after = [r for r in rank0["birder"]["rows"] if r["step"] > 6]
    assert rank0["resumed"]["rows"] == [dict(r, **{k: g[k] for k in timings})
                                        for r, g in zip(after, rank0["resumed"]["rows"])]
