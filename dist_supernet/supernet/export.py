"""Export a subnet of a supernet to a plain ``nn.Module``, and save / load it with its config in one file.

The exported module is built by :func:`families.build_subnet` from the subnet
config alone (ordinary ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` /
``nn.LayerNorm``), then loaded with the supernet's sliced weights, BN running
stats included, with ``strict=True``. Run BN recalibration for the arch first
if the supernet's shared running stats do not fit it.

File format (``save_subnet``): ``{"format": ..., "config": <JSON str>,
"state_dict": {...}}``, readable with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn

from dist_supernet.supernet.space import Supernet
from dist_supernet.supernet.families import build_subnet

SUBNET_FILE_FORMAT = "dist_supernet.subnet/1"


def export_subnet(supernet: Supernet, arch: dict) -> nn.Module:
    """A plain module computing what ``supernet`` computes with ``arch`` active; weights are copies.

    The module carries its config as ``module.subnet_config`` (a dict) for ``save_subnet``.

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> net = OFACNN(in_channels=1, image_size=8, num_classes=10).eval()
        >>> arch = net.min_arch()
        >>> plain = export_subnet(net, arch)
        >>> x = torch.randn(2, 1, 8, 8)
        >>> net.set_active(arch)
        >>> torch.allclose(plain(x), net(x), atol=1e-5)
        True
    """
    config = supernet.subnet_config(arch)
    module = build_subnet(config)
    module.load_state_dict(supernet.export_state(arch), strict=True)
    param = next(supernet.parameters())
    module.to(device=param.device, dtype=param.dtype)
    module.train(supernet.training)
    module.subnet_config = config
    return module


def save_subnet(path: str | os.PathLike, module: nn.Module, config: dict | None = None) -> None:
    """Write config (as JSON) and weights to ``path`` atomically (temp file, then rename).

    ``config`` defaults to ``module.subnet_config`` as set by :func:`export_subnet`.

    Example::
        >>> import os, tempfile
        >>> from dist_supernet.supernet import OFACNN
        >>> net = OFACNN(in_channels=1, image_size=8, num_classes=10)
        >>> path = os.path.join(tempfile.mkdtemp(), "subnet.pt")
        >>> save_subnet(path, export_subnet(net, net.min_arch()))
        >>> module, config = load_subnet(path)
        >>> config["arch"] == net.min_arch()
        True
    """
    config = getattr(module, "subnet_config", None) if config is None else config
    if config is None:
        raise ValueError("config=None: pass the subnet config or a module made by export_subnet")
    payload = {
        "format": SUBNET_FILE_FORMAT,
        "config": json.dumps(config, sort_keys=True),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".subnet-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_subnet(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a saved subnet from its config alone and load its weights; returns ``(module, config)``.

    Loads with ``weights_only=True``: the file holds only a JSON string and tensors.
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("format") != SUBNET_FILE_FORMAT:
        raise ValueError(f"{path}: format={payload.get('format')!r}, expected {SUBNET_FILE_FORMAT!r}")
    config = json.loads(payload["config"])
    module = build_subnet(config)
    module.load_state_dict(payload["state_dict"], strict=True)
    module.subnet_config = config
    return module.eval(), config


__all__ = ["SUBNET_FILE_FORMAT", "build_subnet", "export_subnet", "load_subnet", "save_subnet"]
