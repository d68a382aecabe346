"""Weight-sharing supernets: elastic layers, search spaces, samplers, BN recalibration, search and export.

Model code only: nothing here knows about DDP or compression. The trainer
samples archs (``sampler``), runs ``set_active(arch)`` + forward for each, and
hands ``step_masks(supernet, archs)`` to the optimizer's no-gradient rule.

- ``elastic.py``: elastic layers slicing one shared weight;
- ``subnets.py``: the plain modules exported subnets are made of, ``build_subnet(config)``;
- ``space.py``: ``Supernet`` base (arch dicts, genes, sample / mutate / crossover, ``active_masks``);
- ``ofa_cnn.py``, ``elastic_vit.py``: the two search spaces;
- ``sampler.py``, ``progressive.py``, ``distillation.py``: what trains at a step, and how;
- ``bn_recalibration.py``, ``search.py``, ``export.py``, ``plot.py``: after training;
- ``config.py``: start-up validation of the ``supernet`` config group.

Example::
    >>> net = build_supernet({"name": "ofa_cnn"}, in_channels=1, image_size=8, num_classes=10)
    >>> net.set_active(net.min_arch())
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch  # noqa: F401  (used by the doctest above)

from dist_supernet.supernet.bn_recalibration import recalibrate_bn
from dist_supernet.supernet.config import check_supernet_config, to_plain
from dist_supernet.supernet.distillation import distillation_loss, student_loss
from dist_supernet.supernet.elastic_vit import ElasticViT
from dist_supernet.supernet.export import export_subnet, load_subnet, save_subnet
from dist_supernet.supernet.ofa_cnn import OFACNN
from dist_supernet.supernet.plot import pareto_front, plot_accuracy_vs_flops
from dist_supernet.supernet.progressive import check_phases, elastic_at
from dist_supernet.supernet.sampler import (
    ArchSampler,
    ComplexityAwareSampler,
    SandwichSampler,
    UniformSampler,
    build_sampler,
)
from dist_supernet.supernet.search import SearchResult, evolutionary_search, random_search
from dist_supernet.supernet.space import Gene, Supernet, arch_key, step_masks, union_masks
from dist_supernet.supernet.subnets import build_subnet

SUPERNETS: dict[str, type[Supernet]] = {"ofa_cnn": OFACNN, "elastic_vit": ElasticViT}


def build_supernet(model_cfg: Mapping, in_channels: int, image_size: int, num_classes: int) -> Supernet:
    """Build the supernet named by ``model_cfg["name"]``; the other keys are its choice lists and sizes.

    ``ValueError`` names the key when the name or a key is unknown.

    Example::
        >>> net = build_supernet({"name": "elastic_vit", "depths": [1, 2]}, 1, 8, 10)
        >>> net.max_arch()["depth"]
        2
    """
    cfg = to_plain(model_cfg)
    name = cfg.pop("name", None)
    if name not in SUPERNETS:
        raise ValueError(f"model.name={name!r}: expected one of {', '.join(SUPERNETS)}")
    cls = SUPERNETS[name]
    accepted = {
        p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(cfg) - accepted)
    if unknown:
        raise ValueError(f"model.{unknown[0]}={cfg[unknown[0]]!r}: unknown key for {name}; expected {sorted(accepted)}")
    return cls(in_channels, image_size, num_classes, **cfg)


__all__ = [
    "SUPERNETS",
    "ArchSampler",
    "ComplexityAwareSampler",
    "ElasticViT",
    "Gene",
    "OFACNN",
    "SandwichSampler",
    "SearchResult",
    "Supernet",
    "UniformSampler",
    "arch_key",
    "build_sampler",
    "build_subnet",
    "build_supernet",
    "check_phases",
    "check_supernet_config",
    "distillation_loss",
    "elastic_at",
    "evolutionary_search",
    "export_subnet",
    "load_subnet",
    "pareto_front",
    "plot_accuracy_vs_flops",
    "random_search",
    "recalibrate_bn",
    "save_subnet",
    "step_masks",
    "student_loss",
    "union_masks",
]
