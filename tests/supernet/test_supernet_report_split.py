"""Honest reporting: digits has train / val / test; the search scores on val, the report quotes test."""

import json

import pytest
import torch

from dist_supernet.data import load_dataset
from dist_supernet.supernet import OFACNN, load_subnet
from dist_supernet.train.supernet_report import SubnetEvaluator, format_table, search_and_report


def test_three_way_split_is_disjoint_and_val_unchanged_without_test():
    ds = load_dataset("digits", val_fraction=0.1, test_fraction=0.2, split_seed=0)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (1258, 180, 359) and ds.has_test
    rows = lambda x: {tuple(r.flatten().tolist()) for r in x}  # noqa: E731
    train, val, test = rows(ds.x_train), rows(ds.x_val), rows(ds.x_test)
    # digits has a few duplicate images; the splits are disjoint as index sets, so overlap stays tiny.
    assert len(val & test) <= 2 and len(train & test) <= 5
    # test_fraction=0: the val set is exactly the one from before the test split existed.
    old, new = load_dataset("digits", val_fraction=0.1), load_dataset("digits", val_fraction=0.1, test_fraction=0.0)
    assert torch.equal(old.y_val, new.y_val) and not new.has_test and new.x_test.shape == (0, 1, 8, 8)
    for fraction in (-0.1, 0.9, 1e-5):
        with pytest.raises(ValueError, match="data.test_fraction"):
            load_dataset("digits", val_fraction=0.1, test_fraction=fraction)


def test_search_on_val_report_on_test(tmp_path):
    torch.manual_seed(0)
    data = load_dataset("digits", val_fraction=0.1, test_fraction=0.2, split_seed=0)
    net = OFACNN(1, 8, 10)
    evaluator = SubnetEvaluator(net, data, batch_size=16, num_batches=2, seed=0, device=torch.device("cpu"))
    search = {"population_size": 4, "num_generations": 1, "flops_fractions": [0.5]}
    report = search_and_report(net, evaluator, search, elastic=None, seed=0, output_dir=tmp_path, is_rank0=True)
    assert report["accuracy_split"] == "test" and "val split (180 images)" in report["accuracy"]
    for entry in report["subnets"]:
        _, val_acc = evaluator.score(entry["arch"], split="val")
        _, test_acc = evaluator.score(entry["arch"], split="test")
        assert entry["val_accuracy"] == val_acc and entry["accuracy"] == test_acc, entry["name"]
        # The exported module carries the recalibrated BN stats: it reproduces the reported test accuracy.
        module, _ = load_subnet(tmp_path / entry["file"])
        with torch.no_grad():
            exported = (module(data.x_test).argmax(dim=1) == data.y_test).float().mean().item()
        assert abs(exported - entry["accuracy"]) <= 1 / len(data.y_test)
    assert json.loads((tmp_path / "subnets.json").read_text())["accuracy_split"] == "test"
    assert "val acc" in format_table(report["subnets"]).splitlines()[0]
    with pytest.raises(ValueError, match="split='train'"):
        evaluator.score(net.min_arch(), split="train")

    # Without a test split the report says it quotes val.
    no_test = load_dataset("digits", val_fraction=0.1, split_seed=0)
    evaluator = SubnetEvaluator(net, no_test, batch_size=16, num_batches=2, seed=0, device=torch.device("cpu"))
    report = search_and_report(net, evaluator, {**search, "num_generations": 0}, elastic=None, seed=0,
                               output_dir=tmp_path / "val", is_rank0=True)
    assert report["accuracy_split"] == "val"
    assert all(e["accuracy"] == e["val_accuracy"] for e in report["subnets"])


def test_zero_init_residual_makes_every_depth_the_shallow_function():
    torch.manual_seed(0)
    net = OFACNN(1, 8, 10, zero_init_residual=True)
    x = torch.randn(4, 1, 8, 8)
    net.eval()
    deep = {**net.max_arch()}
    shallow = {**deep, "depth": [1, 1, 1], "kernel_size": [k[:1] for k in deep["kernel_size"]],
               "expand_ratio": [e[:1] for e in deep["expand_ratio"]]}
    with torch.no_grad():
        net.set_active(deep)
        deep_out = net(x)
        net.set_active(shallow)
        assert torch.allclose(deep_out, net(x), atol=1e-6)
    residual_gammas = [b.project.bn.weight for blocks in net.stages for b in blocks if b.residual]
    assert residual_gammas and all(bool((g == 0).all()) for g in residual_gammas)
    assert bool((OFACNN(1, 8, 10).stages[0][1].project.bn.weight == 1).all())  # off by default


def test_default_config_splits_digits_three_ways_and_rejects_a_bad_fraction():
    import os

    from hydra import compose, initialize_config_dir

    from dist_supernet.models import build_model
    from dist_supernet.train.config import ConfigError, register_resolvers, validate

    register_resolvers()
    conf = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "conf"))
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train")
        bad = compose("train", overrides=["data.test_fraction=0.95"])
    checked = validate(cfg)
    assert (checked.data.val_fraction, checked.data.test_fraction) == (0.1, 0.2)
    with pytest.raises(ConfigError, match=r"data.test_fraction=0.95: must be in \[0, 1 - data.val_fraction=0.1\)"):
        validate(bad)
    # The default supernet starts its residual blocks at zero (BigNAS); the standalone baseline does not.
    net = build_model(checked.model, in_channels=1, image_size=8, num_classes=10)
    assert net.zero_init_residual and bool((net.stages[0][1].project.bn.weight == 0).all())
    alone = build_model({"name": "subnet", "arch": "max", "space": {"name": "ofa_cnn"}}, 1, 8, 10)
    gammas = [m.weight for name, m in alone.named_modules() if name.endswith("project.bn")]
    assert gammas and all(bool((g == 1).all()) for g in gammas)
