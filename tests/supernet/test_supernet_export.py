"""Exported subnets: one file with config + weights, loadable with weights_only=True, rebuilt from the config alone."""

import json
import random

import pytest
import torch

from dist_supernet.supernet import build_supernet
from dist_supernet.supernet.export import SUBNET_FILE_FORMAT, export_subnet, load_subnet, save_subnet
from dist_supernet.supernet import build_subnet


@pytest.mark.parametrize("name", ["ofa_cnn", "elastic_vit"])
def test_save_load_round_trip(tmp_path, name):
    torch.manual_seed(0)
    net = build_supernet({"name": name}, 1, 8, 10).eval()
    arch = net.sample(random.Random(4))
    plain = export_subnet(net, arch)
    path = tmp_path / "subnet.pt"
    save_subnet(path, plain)

    payload = torch.load(path, weights_only=True)
    assert payload["format"] == SUBNET_FILE_FORMAT
    config = json.loads(payload["config"])
    assert config["arch"] == arch and config["family"] == name

    loaded, loaded_config = load_subnet(path)
    assert loaded_config == config
    x = torch.randn(2, 1, 8, 8)
    net.set_active(arch)
    torch.testing.assert_close(loaded(x), net(x), atol=1e-5, rtol=0)
    # The builder alone gives the same structure (fresh weights).
    fresh = build_subnet(config)
    shapes = lambda module: [(k, v.shape) for k, v in module.state_dict().items()]  # noqa: E731
    assert shapes(fresh) == shapes(loaded)
    assert not list(tmp_path.glob(".subnet-*"))  # temp file renamed away


def test_export_keeps_training_mode_and_dtype():
    net = build_supernet({"name": "ofa_cnn"}, 1, 8, 10).double().train()
    plain = export_subnet(net, net.min_arch())
    assert plain.training and next(plain.parameters()).dtype == torch.float64


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="family"):
        build_subnet({"family": "resnet"})
    net = build_supernet({"name": "ofa_cnn"}, 1, 8, 10)
    plain = export_subnet(net, net.min_arch())
    with pytest.raises(ValueError, match="config"):
        save_subnet(tmp_path / "x.pt", torch.nn.Linear(2, 2))
    torch.save({"format": "other", "config": "{}", "state_dict": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="format"):
        load_subnet(tmp_path / "bad.pt")
    save_subnet(tmp_path / "ok.pt", plain, plain.subnet_config)
    assert load_subnet(tmp_path / "ok.pt")[1]["arch"] == net.min_arch()
