"""Every supernet config composes with every supernet model config, and one tiny sandwich step runs on CPU."""

import os

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from dist_supernet.supernet import build_supernet, step_masks
from dist_supernet.supernet.config import check_supernet_config
from dist_supernet.supernet.distillation import student_loss
from dist_supernet.supernet.progressive import elastic_at
from dist_supernet.supernet.sampler import build_sampler

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
SUPERNET_CONFIGS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "supernet")) if f.endswith(".yaml"))
MODEL_CONFIGS = ["ofa_cnn", "elastic_vit"]


def _compose(supernet: str, model: str):
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        return compose(overrides=[f"+supernet={supernet}", f"+model={model}"])


@pytest.mark.parametrize("supernet", SUPERNET_CONFIGS)
@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_configs_compose_and_validate(supernet, model):
    cfg = _compose(supernet, model)
    for size in (8, 28):
        net = build_supernet(cfg.model, in_channels=1, image_size=size, num_classes=10)
        if supernet == "progressive_ofa" and model != "ofa_cnn":
            with pytest.raises(ValueError, match=r"progressive_shrinking\[0\]\.elastic"):
                check_supernet_config(cfg.supernet, net)
            continue
        checked = check_supernet_config(cfg.supernet, net)
        sampler = build_sampler(checked["sampler"], net, seed=0)
        elastic = elastic_at(checked["progressive_shrinking"], 0, net.elastic_dims)
        assert all(net.validate_arch(a) == a for a in sampler.sample(0, elastic))


@pytest.mark.parametrize("change, match", [
    ({"sampler": {"name": "greedy"}}, "supernet.sampler.name"),
    ({"distillation": {"weight": 2.0}}, "supernet.distillation.weight"),
    ({"distillation": {"temperature": 0}}, "supernet.distillation.temperature"),
    ({"bn_recalibration": {"num_batches": 0}}, "supernet.bn_recalibration.num_batches"),
    ({"search": {"population": 3}}, "supernet.search.population"),
    ({"search": {"parent_ratio": 1.5}}, "supernet.search.parent_ratio"),
    ({"searhc": {}}, "supernet.searhc"),
    ({"search": {"params_limit": 10}}, r"^supernet.search.params_limit=10: even the smallest subnet has params=6230$"),
])
def test_bad_values_fail_with_the_key(change, match):
    net = build_supernet({"name": "ofa_cnn"}, 1, 8, 10)
    with pytest.raises(ValueError, match=match):
        check_supernet_config(change, net)


def test_one_sandwich_step_with_inplace_distillation():
    """The pieces the trainer strings together: sample, forward each subnet, distil, accumulate, mask."""
    cfg = _compose("progressive_ofa", "ofa_cnn")
    torch.manual_seed(0)
    net = build_supernet(cfg.model, 1, 8, 10).train()
    checked = check_supernet_config(cfg.supernet, net)
    sampler = build_sampler(checked["sampler"], net, seed=0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    step = 150  # second phase: kernel and depth elastic
    elastic = elastic_at(checked["progressive_shrinking"], step, net.elastic_dims)
    archs = sampler.sample(step, elastic)
    full = net.max_arch()
    assert archs[0] == full and archs[1]["depth"] == [min(net.depths)] * net.num_stages
    for arch in archs:  # expand and width are not elastic yet: pinned at max
        assert arch["width_mult"] == full["width_mult"]
        assert all(e == max(net.expand_ratios) for stage in arch["expand_ratio"] for e in stage)
    teacher_logits = None
    for arch in archs:
        net.set_active(arch)
        logits = net(x)
        if teacher_logits is None:
            loss = F.cross_entropy(logits, y)
            teacher_logits = logits.detach()
        else:
            distill = checked["distillation"]  # weight, temperature (start_step is the trainer's)
            loss = student_loss(logits, y, teacher_logits, distill["weight"], distill["temperature"])
        loss.backward()  # local accumulation over the sandwich; one exchange afterwards
    masks = step_masks(net, archs)
    for param in net.parameters():
        grad = torch.zeros_like(param) if param.grad is None else param.grad
        assert torch.all(grad[~masks[param]] == 0)
