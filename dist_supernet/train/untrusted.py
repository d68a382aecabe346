"""Checks on files and directories the user points the trainer at, each failing with one line.

A checkpoint is untrusted input: it may come from another run, another model,
another machine, or a truncated copy. Before training starts:

- ``trainer.checkpoint_dir`` must be a directory we can create and write to;
- a ``trainer.resume=<path>`` checkpoint must match its manifest's sha256 when
  it has one (``step_*.json`` beside it);
- every checkpoint is read with ``torch.load(weights_only=True)``: tensors and
  plain containers only, never code; a file that holds anything else is
  refused in one line (the reason torch gives, not its full explanation);
- its model state must fit the model being built, key by key and shape by
  shape, and the ``model`` config group it was saved with (which holds the
  search space of supernet models) must equal this run's. The first
  mismatched key is named.

Each failure is a :class:`~dist_supernet.train.config.ConfigError` on the
``trainer.resume`` key: the entry point prints ``error: ...`` and exits 2.

Example::
    >>> check_directory("trainer.checkpoint_dir", "/etc/passwd")
    Traceback (most recent call last):
    ...
    dist_supernet.train.config.ConfigError: trainer.checkpoint_dir=/etc/passwd: is a file, not a directory
"""

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dist_supernet.train.checkpoint import load_checkpoint, sha256_file
from dist_supernet.train.config import ConfigError, format_value


def check_directory(key: str, path: str) -> None:
    """``path`` is a writable directory, or can be created as one (its nearest existing ancestor is)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(key, path, "is a file, not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, path, f"cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == target else f"cannot be created: {existing} is not writable"
        raise ConfigError(key, path, what)


def verify_against_manifest(key: str, value, path: Path) -> None:
    """If ``path`` has a manifest beside it (``step_N.json``), its size and sha256 must match."""
    manifest_path = path.with_suffix(".json")
    if not manifest_path.is_file():
        return
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["sha256"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(key, value, f"its manifest {manifest_path.name} is unreadable ({e})") from None
    if sha256_file(path) != expected:
        raise ConfigError(key, value, f"sha256 mismatch with {manifest_path.name} ({path.stat().st_size} of "
                                      f"{manifest.get('num_bytes')} bytes, truncated or corrupt)")


def load_untrusted(key: str, value, path: Path) -> dict:
    """``load_checkpoint`` (weights_only) with any refusal turned into one line naming ``key``."""
    try:
        state = load_checkpoint(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(key, value, f"{path} is not a loadable checkpoint: torch.load(weights_only=True) "
                                      f"refused it ({_one_line(e)})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ConfigError(key, value, f"{path} is not a dist_supernet checkpoint (no model state and step)")
    return state


def _one_line(error: Exception) -> str:
    """The informative line of torch's multi-paragraph load errors."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "global" in line.split(" ", 3)[:3] or "Unsupported" in line:
            return line
    return (lines[0] if lines else type(error).__name__)[:200]


def first_mismatch(expected: dict, saved: dict) -> str | None:
    """The first key (in ``expected``'s order) missing, extra or of another shape in ``saved``; None if all fit."""
    for key, tensor in expected.items():
        if key not in saved:
            return f"{key} (in this model, not in the checkpoint)"
        saved_shape, shape = list(getattr(saved[key], "shape", [])), list(tensor.shape)
        if saved_shape != shape:
            return f"{key} (shape {saved_shape} in the checkpoint, {shape} in this model)"
    for key in saved:
        if key not in expected:
            return f"{key} (in the checkpoint, not in this model)"
    return None


def first_config_mismatch(saved: dict, current: dict, prefix: str) -> str | None:
    """The first dotted key whose value differs between two config mappings."""
    for key in list(current) + [k for k in saved if k not in current]:
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_config_mismatch(a, b, f"{prefix}.{key}")
            if found:
                return found
        elif a != b:
            return f"{prefix}.{key} ({format_value(a)} in the checkpoint, {format_value(b)} in this run)"
    return None


def check_fits_model(key: str, value, path: Path, state: dict, model: torch.nn.Module, model_cfg: dict) -> None:
    """The checkpoint's model state and model config match this run's; else one line naming the first key."""
    saved_model_cfg = {}
    if isinstance(state.get("config"), str):
        saved_model_cfg = OmegaConf.to_container(OmegaConf.create(state["config"])).get("model") or {}
    names = f"saved with model={saved_model_cfg.get('name', '?')}, this run has model={model_cfg.get('name')}"
    mismatch = first_mismatch(model.state_dict(), state["model"])
    if mismatch:
        raise ConfigError(key, value, f"{path.name} is from a different model ({names}): "
                                      f"first mismatched key {mismatch}")
    mismatch = saved_model_cfg and first_config_mismatch(saved_model_cfg, model_cfg, "model")
    if mismatch:
        raise ConfigError(key, value, f"{path.name} is from a different model or search space ({names}): "
                                      f"first mismatched key {mismatch}")
