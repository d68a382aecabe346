"""The supernet families: ONE registration each, which everything else reads.

A family is a weight-sharing search space (a :class:`Supernet` subclass whose
``family`` attribute is its name) and the plain module an exported subnet of it
is (``subnets.py``; for the elastic GPT, ``models.gpt.GPT``). :func:`register_family` records both in ``FAMILIES`` and
registers the name as a supernet model family of the training application
(``model=<name>``, trained by ``SupernetTrainer``). From that one entry:

- :func:`build_supernet` builds the space from a ``model`` config,
- :func:`build_subnet` rebuilds an exported subnet from its subnet config (``load_subnet``),
- ``model=subnet`` (``registry.py``) accepts the family as its ``space``.

Adding a family: write the space (like ``ofa_cnn.py``) and its plain module
(like ``subnets.ConvNet``), then add one ``register_family(Space, PlainModule)`` line below.

Example::
    >>> sorted(FAMILIES)
    ['elastic_gpt', 'elastic_vit', 'ofa_cnn']
    >>> net = build_supernet({"name": "ofa_cnn"}, in_channels=1, image_size=8, num_classes=10)
    >>> type(build_subnet(net.subnet_config(net.min_arch()))).__name__
    'ConvNet'
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping

import torch  # noqa: F401  (used by the doctests)
from torch import nn

from dist_supernet.errors import ConfigError
from dist_supernet.models import register_model
from dist_supernet.supernet.config import to_plain
from dist_supernet.supernet.elastic_gpt import ElasticGPT, gpt_subnet
from dist_supernet.supernet.elastic_vit import ElasticViT
from dist_supernet.supernet.ofa_cnn import OFACNN
from dist_supernet.supernet.space import Supernet
from dist_supernet.supernet.subnets import ConvNet, VisionTransformer


@dataclasses.dataclass(frozen=True)
class SupernetFamily:
    """What the rest of the project needs to know about one family."""

    space: type[Supernet]  # the supernet; built with the data's model inputs and the model config (keywords)
    subnet: Callable[[dict], nn.Module]  # the plain module of an exported subnet; built with its subnet config alone

    @property
    def name(self) -> str:
        return self.space.family

    def config_keys(self) -> list[str]:
        """The ``model.*`` keys the space takes (its keyword-only constructor arguments)."""
        params = inspect.signature(self.space.__init__).parameters.values()
        return sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


FAMILIES: dict[str, SupernetFamily] = {}


def register_family(space: type[Supernet], subnet: Callable[[dict], nn.Module]) -> SupernetFamily:
    """Register ``space`` (named by its ``family`` attribute, trained on ``space.data_kind`` data) with the plain
    module its subnets export to (a class or function taking the subnet config)."""
    family = SupernetFamily(space, subnet)
    assert family.name and family.name not in FAMILIES, f"supernet family {family.name!r}: empty or registered twice"
    FAMILIES[family.name] = family
    register_model(family.name, supernet=True, data=space.data_kind)(build_supernet)
    return family


def build_supernet(model_cfg: Mapping, *inputs, key: str = "model", **named_inputs) -> Supernet:
    """Build the supernet named by ``model_cfg["name"]``; the other keys are its choice lists and sizes.

    ``inputs`` / ``named_inputs``: the data's model inputs (``in_channels, image_size, num_classes``
    for an image family, ``vocab_size`` for a language model). ``ConfigError`` names the key
    (under ``key``, the config path of ``model_cfg``) when the name, a key or a value is wrong.

    Example::
        >>> net = build_supernet({"name": "elastic_vit", "depths": [1, 2]}, 1, 8, 10)
        >>> net.max_arch()["depth"]
        2
        >>> build_supernet({"name": "elastic_gpt", "n_layers": [1, 2]}, vocab_size=30).max_arch()["n_layer"]
        2
    """
    cfg = to_plain(model_cfg)
    name = cfg.pop("name", None)
    if name not in FAMILIES:
        raise ConfigError(f"{key}.name", name, f"expected one of {', '.join(FAMILIES)}")
    family = FAMILIES[name]
    unknown = sorted(set(cfg) - set(family.config_keys()))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", cfg[unknown[0]],
                          f"unknown key for {name}; expected {', '.join(family.config_keys())}")
    try:
        return family.space(*inputs, **named_inputs, **cfg)
    except ConfigError as e:  # the space names its own arguments (depths): here they are config keys
        raise e.under(key) from None


def build_subnet(config: dict) -> nn.Module:
    """Build a freshly initialised plain module from a subnet config (see ``Supernet.subnet_config``).

    Example::
        >>> space = OFACNN(in_channels=1, image_size=8, num_classes=10)
        >>> net = build_subnet(space.subnet_config(space.min_arch()))
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    family = config.get("family")
    if family not in FAMILIES:
        raise ValueError(f"subnet config family={family!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[family].subnet(config)


register_family(OFACNN, ConvNet)
register_family(ElasticViT, VisionTransformer)
register_family(ElasticGPT, gpt_subnet)
