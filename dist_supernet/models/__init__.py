"""Model families for the training application, built by name from the ``model`` config.

Model code knows nothing of DDP or compression: a builder takes the ``model``
config group and what the data says about itself (its ``model_inputs()``) and
returns a plain ``nn.Module``. Two kinds of data, each with its own builder
arguments:

- ``image`` (digits, mnist5k, npz): ``builder(cfg, in_channels, image_size, num_classes)``,
  a module mapping ``(B, C, H, W)`` images to ``(B, num_classes)`` logits;
- ``text`` (data=text): ``builder(cfg, vocab_size)``, a module mapping ``(B, T)``
  token ids to ``(B, T, vocab_size)`` next-token logits, with a ``block_size``
  attribute (the longest sequence it takes: the data cuts its windows to it).

Adding a family (the supernet's ``register_family`` does this for each of its families)::

    from dist_supernet.models import register_model

    @register_model("resnet")
    def build_resnet(cfg, in_channels, image_size, num_classes):
        return ResNet(...)

and add the module that holds it to ``MODEL_PLUGINS`` so that ``build_model``
imports it the first time an unknown name is asked for (keeps
``import dist_supernet.models`` light and the dependency one way).

A text family says so: ``@register_model("gpt", data=TEXT)`` on ``build_gpt(cfg, vocab_size)``.

Example::
    >>> model = build_model({"name": "mlp", "hidden": [32]}, in_channels=1, image_size=8, num_classes=10)
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> build_model({"name": "gpt", "n_layer": 1, "n_embd": 16, "n_head": 2}, vocab_size=30).block_size
    128
"""

import importlib
from collections.abc import Callable, Mapping

import torch  # noqa: F401  (used by the docstring example)
from torch import nn

from dist_supernet.errors import ConfigError

Builder = Callable[..., nn.Module]
IMAGE, TEXT = "image", "text"  # the kinds of data a family trains on (dist_supernet.data's Dataset.kind)
MODELS: dict[str, Builder] = {}
# The kind of data each family trains on; the config check refuses model=gpt with data=digits in one line.
MODEL_DATA: dict[str, str] = {}
# Families whose builder returns a weight-sharing supernet: the entry point trains them with SupernetTrainer.
SUPERNET_MODELS: set[str] = set()
# Modules imported on demand when a name is not registered yet; each registers its families.
MODEL_PLUGINS: list[str] = ["dist_supernet.supernet.registry"]


def register_model(name: str, *, supernet: bool = False,
                   data: str | Callable[[Mapping], str] = IMAGE) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` as ``name``.

    ``data``: the kind of data it trains on, which fixes the builder's arguments:
    ``IMAGE`` -> ``builder(cfg, in_channels, image_size, num_classes)``,
    ``TEXT`` -> ``builder(cfg, vocab_size)``; or a function of the ``model`` config
    returning one of them, for a family whose config decides (``model=subnet``: its
    ``space``), whose builder then takes the inputs as keywords.
    ``supernet=True``: the builder returns a ``dist_supernet.supernet.Supernet``
    (sampled subnets per step, search and export after training).
    """
    if data not in (IMAGE, TEXT) and not callable(data):
        raise ValueError(f"register_model({name!r}, data={data!r}): expected {IMAGE!r}, {TEXT!r} or a function")

    def wrap(builder: Builder) -> Builder:
        if name in MODELS and MODELS[name] is not builder:
            raise ValueError(f"model.name={name}: registered twice")
        MODELS[name] = builder
        MODEL_DATA[name] = data
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


def model_data_kind(name: str, cfg: Mapping | None = None) -> str:
    """The kind of data (``IMAGE`` or ``TEXT``) the family ``name`` trains on (with the ``model`` config ``cfg``, for
    a family whose config decides); ConfigError for an unknown name or config."""
    if name not in MODELS:
        available_models()
    if name not in MODELS:
        raise ConfigError("model.name", name, f"expected one of {', '.join(available_models())}")
    kind = MODEL_DATA[name]
    return kind({"name": name} if cfg is None else cfg) if callable(kind) else kind


def build_model(cfg: Mapping, *args, **inputs) -> nn.Module:
    """Build the model named by ``cfg["name"]``; the rest of ``cfg`` is the family's own.

    ``args``/``inputs``: the family's builder arguments (a dataset's ``model_inputs()``:
    ``in_channels, image_size, num_classes`` for images, ``vocab_size`` for text).
    Raises ``ConfigError`` (a ValueError: ``model.name=resnet: expected one of ...``)
    when the name is unknown; builders raise it naming their own keys (``model.hidden=...``).
    """
    name = cfg["name"]
    model_data_kind(name, cfg)  # an unknown name (or a config naming another family): one line
    return MODELS[name](cfg, *args, **inputs)


# The built-in families register themselves on import.
from dist_supernet.models import cnn, gpt, mlp  # noqa: E402,F401

__all__ = ["IMAGE", "MODELS", "MODEL_DATA", "MODEL_PLUGINS", "SUPERNET_MODELS", "TEXT", "available_models",
           "build_model", "is_supernet", "model_data_kind", "register_model"]
