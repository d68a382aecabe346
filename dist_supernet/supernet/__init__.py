"""Weight-sharing supernets: elastic layers, search spaces, samplers, BN recalibration, search and export.

Model code only: nothing here knows about DDP or compression. The trainer
samples archs (``sampler``), runs ``set_active(arch)`` + forward for each, and
hands ``step_masks(supernet, archs)`` to the optimizer's no-gradient rule.

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

from dist_supernet.supernet.elastic_vit import ElasticViT
from dist_supernet.supernet.ofa_cnn import OFACNN
from dist_supernet.supernet.space import Gene, Supernet, arch_key, step_masks, union_masks

SUPERNETS: dict[str, type[Supernet]] = {"ofa_cnn": OFACNN, "elastic_vit": ElasticViT}


def _plain(value):
    """OmegaConf containers (or any mapping / sequence) to plain dicts and lists, without importing omegaconf."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def build_supernet(model_cfg: Mapping, in_channels: int, image_size: int, num_classes: int) -> Supernet:
    """Build the supernet named by ``model_cfg["name"]``; the other keys are its choice lists and sizes.

    ``ValueError`` names the key when the name or a key is unknown.

    Example::
        >>> net = build_supernet({"name": "elastic_vit", "depths": [1, 2]}, 1, 8, 10)
        >>> net.max_arch()["depth"]
        2
    """
    cfg = _plain(model_cfg)
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
    "ElasticViT",
    "Gene",
    "OFACNN",
    "Supernet",
    "arch_key",
    "build_supernet",
    "step_masks",
    "union_masks",
]
