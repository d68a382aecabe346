"""The supernet side of the app's config: a bad supernet value or choice fails at start in one line."""

from pathlib import Path

import pytest
import torch

from dist_supernet.models import build_model, is_supernet
from dist_supernet.train.config import ConfigError, check_group_choices
from dist_supernet.train.preflight import check_config
from tests.configs import compose_train

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"


_compose = compose_train


def test_unknown_supernet_choice_is_one_line_before_hydra():
    with pytest.raises(ConfigError, match=r"^supernet=typo: expected one of complexity_aware, progressive_ofa, "
                                          r"sandwich"):
        check_group_choices(["supernet=typo"], CONF_DIR)


@pytest.mark.parametrize("overrides, message", [
    (["supernet.sampler.name=greedy"], "supernet.sampler.name=greedy: expected one of"),
    (["supernet.search.flops_fractions=[0.5,2]"], "supernet.search.flops_fractions=[0.5,2]: expected null or"),
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
    with pytest.raises(ConfigError, match=r"^model.arch=medium: expected max, min or an arch dict$"):
        build_model({"name": "subnet", "arch": "medium", "space": {"name": "ofa_cnn"}}, 1, 8, 10)


# The one validation pass (preflight.check_config) that the trainer, the pre-flight and the sweep call: a bad
# supernet.* or model.* value is one ConfigError in the one format, before any process, group or weight exists.
BAD_SUPERNET_AND_MODEL_VALUES = [
    (["supernet.distillation.weight=2"], "supernet.distillation.weight=2: expected a number in [0, 1]"),
    (["supernet.sampler.num_archs=-1"], "supernet.sampler.num_archs=-1: expected a non-negative integer"),
    (["supernet.search.population_size=1"], "supernet.search.population_size=1: expected an integer >= 2"),
    (["supernet.search.flops_limit=1000"], "supernet.search.flops_limit=1000: even the smallest subnet has flops="),
    (["+supernet.search.populaton=8"], "supernet.search.populaton=8: unknown key; expected population_size, "),
    (["model.depths=[0,2]"], "model.depths=[0,2]: choices must be positive"),
    (["model.kernel_sizes=[4]"], "model.kernel_sizes=[4]: kernel sizes must be odd (centre crop), got [4]"),
    (["model=elastic_vit", "model.patch_size=3"], "model.patch_size=3: must divide image_size=8"),
    (["model=elastic_vit", "+model.depth=2"], "model.depth=2: unknown key for elastic_vit; expected depths, "),
    (["model=mlp", "model.hidden=[0]"], "model.hidden=[0]: expected a non-empty list of positive integers"),
    (["model=subnet", "+model.space.depths=[0]"], "model.space.depths=[0]: choices must be positive"),
]


@pytest.mark.parametrize("overrides, message", BAD_SUPERNET_AND_MODEL_VALUES,
                         ids=[" ".join(o) for o, _ in BAD_SUPERNET_AND_MODEL_VALUES])
def test_the_validation_pass_rejects_bad_supernet_and_model_values(overrides, message, tmp_path):
    import torch.distributed as dist

    with pytest.raises(ConfigError) as error:
        check_config(_compose(*overrides), tmp_path / "run", world_size=2)
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text, text
    assert not dist.is_initialized() and list(tmp_path.iterdir()) == []


def test_the_validation_pass_builds_the_model_on_the_meta_device(tmp_path):
    checked = check_config(_compose("supernet=progressive_ofa"), tmp_path / "run", world_size=2)
    assert {p.device.type for p in checked.model.parameters()} == {"meta"}  # shapes only, no weights
    assert checked.supernet["progressive_shrinking"][0]["elastic"] == frozenset({"kernel"})
    assert checked.config_dict["model"]["name"] == "ofa_cnn" and checked.data.num_classes == 10
    plain = check_config(_compose("model=mlp"), tmp_path / "run", world_size=2)
    assert plain.supernet is None and list(tmp_path.iterdir()) == []
