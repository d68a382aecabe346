"""Model families for the training application, built by name from the ``model`` config.

Model code knows nothing of DDP or compression: a builder takes the ``model``
config group and the data's shape and returns a plain ``nn.Module`` mapping
``(B, C, H, W)`` images to ``(B, num_classes)`` logits.

Adding a family (the supernet's ``register_family`` does this for each of its families)::

    from dist_supernet.models import register_model

    @register_model("resnet")
    def build_resnet(cfg, in_channels, image_size, num_classes):
        return ResNet(...)

and add the module that holds it to ``MODEL_PLUGINS`` so that ``build_model``
imports it the first time an unknown name is asked for (keeps
``import dist_supernet.models`` light and the dependency one way).

Example::
    >>> model = build_model({"name": "mlp", "hidden": [32]}, in_channels=1, image_size=8, num_classes=10)
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

import importlib
from collections.abc import Callable, Mapping

import torch  # noqa: F401  (used by the docstring example)
from torch import nn

from dist_supernet.errors import ConfigError

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}
# Families whose builder returns a weight-sharing supernet: the entry point trains them with SupernetTrainer.
SUPERNET_MODELS: set[str] = set()
# Modules imported on demand when a name is not registered yet; each registers its families.
MODEL_PLUGINS: list[str] = ["dist_supernet.supernet.registry"]


def register_model(name: str, *, supernet: bool = False) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(cfg, in_channels, image_size, num_classes)`` as ``name``.

    ``supernet=True``: the builder returns a ``dist_supernet.supernet.Supernet``
    (sampled subnets per step, search and export after training).
    """

    def wrap(builder: Builder) -> Builder:
        if name in MODELS and MODELS[name] is not builder:
            raise ValueError(f"model.name={name}: registered twice")
        MODELS[name] = builder
        if supernet:
            SUPERNET_MODELS.add(name)
        return builder

    return wrap


def available_models() -> list[str]:
    """Every registered name, after importing the plugin modules."""
    for module in MODEL_PLUGINS:
        importlib.import_module(module)
    return sorted(MODELS)


def is_supernet(name: str) -> bool:
    """True when ``name`` is registered with ``supernet=True`` (after importing the plugin modules)."""
    if name not in MODELS:
        available_models()
    return name in SUPERNET_MODELS


def build_model(cfg: Mapping, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Build the model named by ``cfg["name"]``; the rest of ``cfg`` is the family's own.

    Raises ``ConfigError`` (a ValueError: ``model.name=resnet: expected one of ...``)
    when the name is unknown; builders raise it naming their own keys (``model.hidden=...``).
    """
    name = cfg["name"]
    if name not in MODELS:
        available_models()
    if name not in MODELS:
        raise ConfigError("model.name", name, f"expected one of {', '.join(available_models())}")
    return MODELS[name](cfg, in_channels=in_channels, image_size=image_size, num_classes=num_classes)


# The built-in families register themselves on import.
from dist_supernet.models import cnn, mlp  # noqa: E402,F401

__all__ = ["MODELS", "MODEL_PLUGINS", "SUPERNET_MODELS", "available_models", "build_model", "is_supernet",
           "register_model"]
