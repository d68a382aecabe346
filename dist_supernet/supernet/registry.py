"""The supernets as model families of the training application (``model=ofa_cnn``, ``model=elastic_vit``).

Imported on demand by ``dist_supernet.models`` (it is listed in
``MODEL_PLUGINS``), so ``import dist_supernet.models`` stays light and this
package depends on ``models``, never the other way round.

- every family of ``families.FAMILIES`` (``ofa_cnn``, ``elastic_vit``, ``elastic_gpt``): the
  weight-sharing supernets, registered by ``register_family`` with
  ``supernet=True`` so that the entry point trains them with ``SupernetTrainer``;
- ``subnet``: ONE fixed architecture of a supernet as a plain module, trained
  alone (the standalone baseline of ``benchmarks/supernet_vs_standalone.py``), on
  the data its space trains on (``model.space.name=elastic_gpt``: text, a plain ``GPT``).
  Its weights are those of a freshly initialised supernet, sliced by
  ``export_subnet``, so a standalone run starts where the supernet's slice does.

Example::
    >>> from dist_supernet.models import build_model, is_supernet
    >>> net = build_model({"name": "subnet", "arch": "min", "space": {"name": "ofa_cnn"}}, in_channels=1,
    ...                   image_size=8, num_classes=10)
    >>> net(torch.zeros(2, 1, 8, 8)).shape, is_supernet("ofa_cnn"), is_supernet("subnet")
    (torch.Size([2, 10]), True, False)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch  # noqa: F401  (used by the doctest above)
from torch import nn

from dist_supernet.errors import ConfigError
from dist_supernet.models import register_model
from dist_supernet.supernet import FAMILIES, build_supernet, export_subnet
from dist_supernet.supernet.config import to_plain
from dist_supernet.supernet.space import Supernet


def resolve_arch(space: Supernet, arch, key: str = "model.arch") -> dict:
    """``"max"``, ``"min"`` or an arch dict (as written in ``subnets.json``) -> a validated arch of ``space``."""
    if arch == "max":
        return space.max_arch()
    if arch == "min":
        return space.min_arch()
    if isinstance(arch, Mapping):
        try:
            return space.validate_arch(to_plain(arch))
        except ValueError as e:
            raise ConfigError(key, to_plain(arch), str(e)) from None
    raise ConfigError(key, arch, "expected max, min or an arch dict")


def _space_config(cfg: Mapping) -> dict:
    space_cfg = to_plain(cfg.get("space") or {})
    if not isinstance(space_cfg, Mapping) or space_cfg.get("name") not in FAMILIES:
        raise ConfigError("model.space", space_cfg,
                          f"expected a supernet model config with name one of {', '.join(FAMILIES)}")
    return space_cfg


def _subnet_data_kind(cfg: Mapping) -> str:
    """The data a standalone subnet trains on: its space's (images for ofa_cnn, text for elastic_gpt)."""
    return FAMILIES[_space_config(cfg)["name"]].space.data_kind


@register_model("subnet", data=_subnet_data_kind)
def build_standalone_subnet(cfg: Mapping, *inputs, **named_inputs) -> nn.Module:
    """Keys: ``arch`` (max | min | arch dict) and ``space`` (a supernet model config, e.g. ``{name: ofa_cnn}``).

    ``inputs`` / ``named_inputs``: the data's model inputs (``in_channels, image_size, num_classes``, or
    ``vocab_size``).
    """
    cfg = to_plain(cfg)
    unknown = sorted(set(cfg) - {"name", "arch", "space"})
    if unknown:
        raise ConfigError(f"model.{unknown[0]}", cfg[unknown[0]], "unknown key for subnet; expected arch, space")
    space = build_supernet(_space_config(cfg), *inputs, key="model.space", **named_inputs)
    return export_subnet(space, resolve_arch(space, cfg.get("arch", "max")))


__all__ = ["build_standalone_subnet", "resolve_arch"]
