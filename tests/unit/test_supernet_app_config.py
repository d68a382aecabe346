"""The supernet side of the app's config: a bad supernet value or choice fails at start in one line."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dist_supernet.models import build_model, is_supernet
from dist_supernet.train.config import ConfigError, check_group_choices, register_resolvers

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"


def _compose(*overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_unknown_supernet_choice_is_one_line_before_hydra():
    with pytest.raises(ConfigError, match=r"^supernet=typo: expected one of complexity_aware, progressive_ofa, "
                                          r"sandwich"):
        check_group_choices(["supernet=typo"], CONF_DIR)


@pytest.mark.parametrize("overrides, message", [
    (["supernet.sampler.name=greedy"], "supernet.sampler.name='greedy'"),
    (["supernet.search.flops_fractions=[0.5,2]"], "search.flops_fractions=[0.5, 2]"),
    (["supernet=progressive_ofa", "model=elastic_vit"], "supernet.progressive_shrinking[0].elastic"),
    (["~supernet"], "supernet=null: model=ofa_cnn is a supernet and needs the supernet config group"),
])
def test_bad_supernet_config_fails_before_the_process_group(overrides, message):
    import torch.distributed as dist

    from dist_supernet.train.supernet_trainer import SupernetTrainer

    with pytest.raises(ValueError) as error:
        SupernetTrainer(_compose(*overrides), output_dir=Path("/nonexistent/never-written"))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not dist.is_initialized()


def test_registry_flags_and_the_standalone_subnet_family():
    assert is_supernet("ofa_cnn") and is_supernet("elastic_vit")
    assert not is_supernet("mlp") and not is_supernet("subnet") and not is_supernet("no_such_model")
    cfg = _compose("model=subnet", "model.arch=min").model
    torch.manual_seed(0)
    net = build_model(cfg, in_channels=1, image_size=8, num_classes=10)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert sum(p.numel() for p in net.parameters()) == 6230  # the min subnet's exported params
    with pytest.raises(ValueError, match=r"^model.arch='medium': expected max, min or an arch dict"):
        build_model({"name": "subnet", "arch": "medium", "space": {"name": "ofa_cnn"}}, 1, 8, 10)
