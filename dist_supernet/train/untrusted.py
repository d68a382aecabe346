"""Checks on files and directories the user points the trainer at, each failing with one line.

A checkpoint is untrusted input: it may come from another run, another model,
another machine, or a truncated copy, and its digests only prove it is intact,
not that it is harmless (whoever crafts the files can craft the manifest).
So everything read from one is parsed with a bound:

- ``manifest.json``: JSON only (no YAML, hence no alias expansion), at most
  ``MAX_MANIFEST_BYTES``, nesting deeper than Python's recursion limit refused;
- DCP's ``.metadata`` pickle: at most ``MAX_METADATA_BYTES``, through an
  unpickler that builds only DCP's own metadata classes, ``torch.Size``,
  dtypes and paths (:func:`load_dcp_metadata`); storage entries must name
  plain files inside the checkpoint;
- tensors and non-tensor items: ``torch.load(weights_only=True)``;
- config text (YAML) found in a checkpoint: ``parse_config_text``, at most
  ``MAX_CONFIG_BYTES`` and with aliases refused, so a few hundred crafted bytes
  cannot expand into gigabytes (issue 13).

Before training starts:

- ``trainer.checkpoint_dir`` must be a directory we can create and write to;
- the checkpoint's model tensors must fit the model being built, key by key
  and shape by shape (from the metadata, before any tensor is read), and the
  ``model`` config group it was saved with must equal this run's
  (:func:`check_fits_model`);
- its recipe must be this run's: optimizer, compression and collective, and
  the supernet's sampling (:func:`check_recipe`), unless
  ``trainer.resume_weights_only=true``.

Each failure is a :class:`~dist_supernet.train.config.ConfigError` on the
``trainer.resume`` key: the entry point prints ``error: ...`` and exits 2.

Example::
    >>> check_directory("trainer.checkpoint_dir", "/etc/passwd")
    Traceback (most recent call last):
    ...
    dist_supernet.train.config.ConfigError: trainer.checkpoint_dir=/etc/passwd: is a file, not a directory
"""

import io
import json
import os
import pickle
from pathlib import Path

import torch
import yaml

from dist_supernet.train.config import ConfigError, format_value

MAX_MANIFEST_BYTES = 4 << 20  # why: a manifest is the config (~10 KB) plus ~150 B per file (2 per rank)
MAX_METADATA_BYTES = 64 << 20  # why: ~300 B per saved item; 64 MiB is > 200k items (a 1B-param model has ~1k)
MAX_CONFIG_BYTES = 1 << 20  # why: a composed config is ~5-10 KB


def check_directory(key: str, path: str) -> None:
    """``path`` is a writable directory, or can be created as one (its nearest existing ancestor is)."""
    from dist_supernet.train.preflight import os_error_problem, path_name_problem

    problem = path_name_problem(path)
    if problem:
        raise ConfigError(key, path, problem)
    try:
        _check_directory(key, path)
    except OSError as e:
        raise ConfigError(key, path, f"cannot be used: {os_error_problem(e)}") from None


def _check_directory(key: str, path: str) -> None:
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


# -- bounded parsing ------------------------------------------------------------------------------


def _read_capped(path: Path, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path.name} is {size} bytes, more than the {max_bytes} this file may have")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)[:max_bytes]


def read_json_capped(path: Path, max_bytes: int = MAX_MANIFEST_BYTES):
    """``json.loads`` of a file of at most ``max_bytes``; ValueError (one line) otherwise."""
    data = _read_capped(Path(path), max_bytes)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{Path(path).name} is nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"{Path(path).name} is not JSON ({e})") from None


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases: ``*ref`` is how a few bytes expand into gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ValueError(f"YAML alias *{event.anchor} at line {event.start_mark.line + 1}: aliases are refused "
                             "in config text read from a checkpoint")
        return super().compose_node(parent, index)


def parse_config_text(text: str, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A YAML mapping of at most ``max_bytes``, without alias expansion; ValueError (one line) otherwise."""
    if len(text.encode()) > max_bytes:
        raise ValueError(f"config text is {len(text.encode())} bytes, more than {max_bytes}")
    try:
        value = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ValueError(f"config text is not YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ValueError("config text is nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"config text is a {type(value).__name__}, not a mapping")
    return value


_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.strided etc. by name
    ("pathlib", "PosixPath"),  # storage_meta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP writes into ``.metadata`` (torch 2.13); any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which a DCP index never holds")


def load_dcp_metadata(path: Path):
    """DCP's ``.metadata`` through :class:`_MetadataUnpickler`, size-capped and checked; ValueError (one line).

    DCP itself calls ``pickle.load`` on this file: a crafted one would run code.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(_read_capped(path, MAX_METADATA_BYTES))).load()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 (UnpicklingError, EOFError, AttributeError, ...: all one refusal)
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ValueError(f"{path.parent.name}/{path.name} is refused: {why}") from None
    if not (isinstance(metadata, Metadata) and isinstance(metadata.state_dict_metadata, dict)
            and isinstance(metadata.storage_data, dict)):
        raise ValueError(f"{path.parent.name}/{path.name} is not a DCP index")
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not (isinstance(name, str) and name and "/" not in name and "\\" not in name and name not in (".", "..")
                and isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0):
            raise ValueError(f"{path.parent.name}/{path.name}: storage entry of {getattr(index, 'fqn', index)!r} "
                             f"points outside the checkpoint ({name!r})")
    return metadata


def one_line(error: BaseException) -> str:
    """The informative line of a multi-paragraph error (torch's weights_only refusal, DCP's per-rank wrap)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "global" in line.split(" ", 3)[:3]:
            return line[:300]
    for line in lines:
        if "Error:" in line and not line.startswith(("Traceback", "File ")):
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]


# -- does the checkpoint fit this run ---------------------------------------------------------------


def _shape(value) -> list[int]:
    shape = getattr(value, "shape", value)
    return list(shape) if isinstance(shape, (list, tuple, torch.Size)) else []


def first_mismatch(expected: dict, saved: dict) -> str | None:
    """The first key (in ``expected``'s order) missing, extra or of another shape in ``saved``; None if all fit.

    ``saved`` maps names to tensors or to shapes (lists), e.g. from a checkpoint's metadata.
    """
    for key, tensor in expected.items():
        if key not in saved:
            return f"{key} (in this model, not in the checkpoint)"
        saved_shape, shape = _shape(saved[key]), list(tensor.shape)
        if saved_shape != shape:
            return f"{key} (shape {saved_shape} in the checkpoint, {shape} in this model)"
    for key in saved:
        if key not in expected:
            return f"{key} (in the checkpoint, not in this model)"
    return None


# Keys added to the config since checkpoints were first written, with the value that behaves as before.
ADDED_KEYS = {"optim.normalizer": "abs"}


def first_config_mismatch(saved: dict, current: dict, prefix: str, skip: tuple = ()) -> str | None:
    """The first dotted key whose value differs between two config mappings (``skip``: dotted keys to ignore)."""
    for key in list(current) + [k for k in saved if k not in current]:
        dotted = f"{prefix}.{key}"
        if dotted in skip:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if key not in saved and (b is None or ADDED_KEYS.get(dotted, "<none>") == b):
            continue  # a key added since (optim.grad_clip, optim.normalizer) at its old behaviour: the same recipe
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_config_mismatch(a, b, dotted, skip)
            if found:
                return found
        elif a != b:
            return f"{dotted} ({format_value(a)} in the checkpoint, {format_value(b)} in this run)"
    return None


def saved_config(key: str, value, state: dict) -> dict:
    """The config a checkpoint was written with: a mapping, or YAML text parsed with a bound ({} if absent)."""
    config = state.get("config")
    if isinstance(config, str):
        try:
            return parse_config_text(config)
        except ValueError as e:
            raise ConfigError(key, value, f"the checkpoint's config is refused: {e}") from None
    return config if isinstance(config, dict) else {}


def check_fits_model(key: str, value, path: Path, state: dict, model: torch.nn.Module, model_cfg: dict) -> None:
    """The checkpoint's model tensors and model config match this run's; else one line naming the first key.

    ``state``: ``{"model": {name: tensor or shape}, "config": mapping or YAML text}``.
    """
    saved_model_cfg = saved_config(key, value, state).get("model") or {}
    names = f"saved with model={saved_model_cfg.get('name', '?')}, this run has model={model_cfg.get('name')}"
    mismatch = first_mismatch(model.state_dict(), state["model"])
    if mismatch:
        raise ConfigError(key, value, f"{path.name} is from a different model ({names}): "
                                      f"first mismatched key {mismatch}")
    mismatch = saved_model_cfg and first_config_mismatch(saved_model_cfg, model_cfg, "model")
    if mismatch:
        raise ConfigError(key, value, f"{path.name} is from a different model or search space ({names}): "
                                      f"first mismatched key {mismatch}")


# What resuming must not change (issue 13): the optimizer (its state would not fit or mean the
# same), compression and collective (another hook, another wire format), the supernet's sampling
# (the arch sampler's state is restored), the low-frequency synchronisation (its state is per shard). Timeouts and the after-training search/recalibration
# settings change no state, so they may differ.
RECIPE_GROUPS = ("optim", "compression", "supernet", "sync")
RECIPE_SKIP = ("compression.timeout_s", "supernet.search", "supernet.bn_recalibration")


def check_recipe(key: str, value, name: str, saved: dict, current: dict) -> None:
    """The checkpoint's optimizer, compression (collective included) and supernet config equal this run's.

    One line naming the first differing key and both values; ``{}`` (unknown recipe) passes.
    """
    if not saved:
        return
    for group in RECIPE_GROUPS:
        a, b = saved.get(group), current.get(group)
        if isinstance(a, dict) and isinstance(b, dict):
            mismatch = first_config_mismatch(a, b, group, RECIPE_SKIP)
        else:
            mismatch = None if a == b else f"{group} ({format_value(a)} in the checkpoint, {format_value(b)} in this run)"
        if mismatch:
            raise ConfigError(key, value, f"{name} was written with another recipe: first differing key {mismatch}; "
                                          "trainer.resume_weights_only=true loads only its model weights")
    # DDP and HSDP keep Birder's m, b in different layouts (whole model per rank, or one shard per rank).
    a, b = ((cfg.get("trainer") or {}).get("parallelism", "ddp") for cfg in (saved, current))
    if a != b:
        raise ConfigError(key, value, f"{name} was written with another recipe: first differing key "
                                      f"trainer.parallelism ({a} in the checkpoint, {b} in this run); "
                                      "trainer.resume_weights_only=true loads only its model weights")


def check_optimizer_state(key: str, value, name: str, stored: str | None, optim_name: str) -> None:
    """The optimizer state the checkpoint's own index holds is this run's optimizer's (manifest or not).

    ``stored``: :func:`~dist_supernet.train.checkpoint.index_optimizer` of the checkpoint
    (``birder``, ``adamw``, ``sgd``, or None: no optimizer state, which the load then refuses).
    A checkpoint without manifest has no recorded recipe; this is what its files say.
    """
    if stored is not None and stored != optim_name:
        where = "per-rank m, b" if stored == "birder" else "replicated state"
        raise ConfigError(key, value, f"{name} holds {stored} optimizer state ({where}), this run has "
                                      f"optim={optim_name}; trainer.resume_weights_only=true loads only its model weights")


def check_steps_left(name: str, step: int, max_steps: int) -> None:
    """A checkpoint past ``trainer.max_steps`` is a mistake (a lowered max_steps, the wrong run), not a finished run."""
    if step > max_steps:
        raise ConfigError("trainer.max_steps", max_steps, f"the checkpoint to resume, {name}, is at step {step}, past "
                                                          "it: raise trainer.max_steps to train on, or resume an "
                                                          "earlier checkpoint")
