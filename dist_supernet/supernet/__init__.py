"""Weight-sharing supernets: elastic layers, search spaces, samplers, BN recalibration, search and export.

Model code only: nothing here knows about DDP or compression. The trainer
samples archs (``sampler``), runs ``set_active(arch)`` + forward for each, and
hands ``step_masks(supernet, archs)`` to the optimizer's no-gradient rule.

- ``elastic.py``: elastic layers slicing one shared weight;
- ``subnets.py``: the plain modules exported subnets are made of;
- ``space.py``: ``Supernet`` base (arch dicts, genes, sample / mutate / crossover, ``active_masks``);
- ``ofa_cnn.py``, ``elastic_vit.py``: the two search spaces;
- ``families.py``: one registration per family (space + plain subnet module): ``build_supernet``, ``build_subnet``;
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

import torch  # noqa: F401  (used by the doctest above)

from dist_supernet.supernet.bn_recalibration import recalibrate_bn
from dist_supernet.supernet.config import check_supernet_config
from dist_supernet.supernet.distillation import distillation_loss, student_loss
from dist_supernet.supernet.elastic_vit import ElasticViT
from dist_supernet.supernet.export import export_subnet, load_subnet, save_subnet
from dist_supernet.supernet.families import FAMILIES, SupernetFamily, build_subnet, build_supernet, register_family
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

__all__ = [
    "FAMILIES",
    "ArchSampler",
    "ComplexityAwareSampler",
    "ElasticViT",
    "Gene",
    "OFACNN",
    "SandwichSampler",
    "SearchResult",
    "Supernet",
    "SupernetFamily",
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
    "register_family",
    "save_subnet",
    "step_masks",
    "student_loss",
    "union_masks",
]
