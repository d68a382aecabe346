"""Supernet training under Birder on real gloo processes, and the supernet main job end to end.

Two spawns: the real ``SupernetTrainer.train_step`` on 2 ranks (one exchange
per step, untouched slices keep x, m and b, replicas bit-identical), and the
default main job under torchrun with a tiny budget.
"""

import json
import socket
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_workers
from tests.distributed.jobs import REPO, run, torchrun


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _trainer_worker(rank, world_size, run_dir):
    """Drive SupernetTrainer.train_step by hand: sandwich steps, then steps that never run the max subnet."""
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from dist_supernet.supernet import build_sampler
    from dist_supernet.train import distributed
    from dist_supernet.train.config import register_resolvers
    from dist_supernet.train.supernet_trainer import SupernetTrainer

    dist.destroy_process_group()  # the trainer makes its own (env://), as under torchrun
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.grad_accum=2", "trainer.batch_size=8", "trainer.max_steps=10",
                                          "trainer.resume=never", "supernet.bn_recalibration.num_batches=2",
                                          "optim.weight_decay=0.1"])  # decay would move untouched slices too
    trainer = SupernetTrainer(cfg, output_dir=Path(run_dir))
    model, opt = trainer.model, trainer.optimizer
    out = {"find_unused": trainer.ddp_model.find_unused_parameters}

    def run_step():
        before = opt.comm_stats.num_exchanges
        trainer.train_step()
        trainer.step += 1
        return opt.comm_stats.num_exchanges - before

    # Sandwich (max, min, 2 random) x 2 micro-batches: 8 forward/backward, one exchange.
    out["sandwich_exchanges"] = [run_step() for _ in range(2)]

    # A sampler that never picks the max arch: some slices get no gradient in a step.
    trainer.arch_sampler = build_sampler({"name": "uniform", "num_archs": 2}, model, seed=1)
    params = list(model.parameters())
    out["uniform"] = []
    for _ in range(3):
        archs = trainer.arch_sampler.sample(trainer.step, trainer.elastic_dims(trainer.step))
        touched = trainer._step_mask(archs)
        x0 = _flat(params).clone()
        m0, b0 = _flat(opt.state[p]["m"] for p in params).clone(), _flat(opt.state[p]["b"] for p in params).clone()
        exchanges = run_step()
        x1, m1, b1 = _flat(params), _flat(opt.state[p]["m"] for p in params), _flat(opt.state[p]["b"] for p in params)
        untouched = ~touched
        out["uniform"].append({
            "exchanges": exchanges,
            "num_untouched": int(untouched.sum()),
            "untouched_x_kept": bool(torch.equal(x1[untouched], x0[untouched])),
            "untouched_m_kept": bool(torch.equal(m1[untouched], m0[untouched])),
            "untouched_b_kept": bool(torch.equal(b1[untouched], b0[untouched])),
            "touched_moved": bool((x1[touched] != x0[touched]).any()),
        })

    # evaluate() recalibrates BN for the max subnet and puts the buffers back.
    buffers = _flat(model.buffers()).clone()
    out["eval"] = trainer.evaluate()
    out["buffers_kept"] = bool(torch.equal(_flat(model.buffers()), buffers))
    out["params_sha256"] = distributed.params_sha256(model)
    out["sampler_state"] = trainer.extra_state()["arch_sampler"]["name"]
    return out


def test_supernet_trainer_steps_on_two_ranks(tmp_path):
    results = run_workers(_trainer_worker, 2, str(tmp_path / "run"), timeout_s=180,
                          env={"MASTER_PORT": _free_port()})
    for rank, out in enumerate(results):
        assert out["find_unused"], rank
        assert out["sandwich_exchanges"] == [1, 1], (rank, out)
        for step in out["uniform"]:
            assert step["exchanges"] == 1 and step["num_untouched"] > 0, (rank, step)
            assert step["untouched_x_kept"] and step["untouched_m_kept"] and step["untouched_b_kept"], (rank, step)
            assert step["touched_moved"], (rank, step)
        assert out["buffers_kept"] and out["sampler_state"] == "uniform"
    assert results[0]["params_sha256"] == results[1]["params_sha256"]  # replicas bit-identical
    assert results[0]["eval"] == results[1]["eval"]


def test_supernet_main_job_end_to_end(tmp_path):
    from dist_supernet.data import load_dataset
    from dist_supernet.supernet import load_subnet

    run_dir = tmp_path / "run"
    out = run(torchrun("trainer.max_steps=6", "trainer.log_every=3", "trainer.eval_every=0",
                       "trainer.checkpoint_every=0", "supernet.search.population_size=4",
                       "supernet.search.num_generations=1", "supernet.bn_recalibration.num_batches=2",
                       f"hydra.run.dir={run_dir}"), cwd=tmp_path, timeout_s=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "searched_3" in out.stdout + out.stderr  # rank 0 logs the subnet table

    report = json.loads((run_dir / "subnets.json").read_text())
    names = [entry["name"] for entry in report["subnets"]]
    assert names[:2] == ["max", "min"] and sum(n.startswith("searched") for n in names) >= 3, names
    for entry in report["subnets"]:
        assert {"arch", "flops", "params", "accuracy"} <= entry.keys(), entry
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["flops"] <= entry.get("flops_limit", entry["flops"])
    by_name = {e["name"]: e for e in report["subnets"]}
    assert by_name["min"]["flops"] < by_name["max"]["flops"]
    assert (run_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    # The exported max subnet is a plain module with the recalibrated BN stats: same test accuracy (the
    # report quotes digits' test split; the search scored val).
    assert report["accuracy_split"] == "test"
    module, config = load_subnet(run_dir / by_name["max"]["file"])
    assert config["arch"] == by_name["max"]["arch"]
    data = load_dataset("digits", path=None, val_fraction=0.1, test_fraction=0.2, split_seed=0)
    with torch.no_grad():
        accuracy = (module(data.x_test).argmax(dim=1) == data.y_test).float().mean().item()
        val_accuracy = (module(data.x_val).argmax(dim=1) == data.y_val).float().mean().item()
    assert abs(accuracy - by_name["max"]["accuracy"]) <= 1 / len(data.y_test)
    assert abs(val_accuracy - by_name["max"]["val_accuracy"]) <= 1 / len(data.y_val)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["params_in_sync"] is True and summary["compression"] == "birder"
    assert summary["test_accuracy"] == by_name["max"]["accuracy"]  # the max subnet, recalibrated the same way
    assert summary["model"] == "ofa_cnn" and summary["steps"] == 6
    for key in ("final_loss", "eval_accuracy", "world_size", "collective", "bytes_sent_total"):
        assert key in summary
    assert summary["eval_accuracy"] == by_name["max"]["val_accuracy"]  # the last evaluate(): val
    assert summary["supernet"]["min_accuracy"] == by_name["min"]["accuracy"]

    # TensorBoard (trainer.tensorboard=auto, tensorboard installed): each reported subnet's accuracies.
    pytest.importorskip("tensorboard")
    from tests.distributed.jobs import read_scalars

    scalars = read_scalars(run_dir)
    for name, entry in by_name.items():
        assert scalars[f"subnet/{name}/accuracy"] == [(6, pytest.approx(entry["accuracy"]))], name
        assert scalars[f"subnet/{name}/val_accuracy"] == [(6, pytest.approx(entry["val_accuracy"]))], name
        assert scalars[f"subnet/{name}/mflops"] == [(6, pytest.approx(entry["flops"] / 1e6))], name
    assert [step for step, _ in scalars["train/loss"]] == [3, 6]
