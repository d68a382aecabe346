"""Atomic checkpoints with a manifest, loaded with ``weights_only=True``.

A checkpoint is two files in one directory::

    step_00000100.pt     torch.save of a dict of tensors and plain values
    step_00000100.json   manifest: {"step", "world_size", "sha256", "file", "num_bytes", "time"}

Each is written to a temporary name, fsynced and renamed, the ``.pt`` first:
a manifest exists only for a complete ``.pt``, and a crash at any point
leaves the previous checkpoint usable. On resume the newest checkpoint whose
manifest parses and whose sha256 matches wins; each newer one that fails, or
that an interrupted save left behind (a temporary, or a ``.pt`` without its
manifest), is reported in one warning line, and the next complete save removes
such leftovers (docs/reliability.md). Only rank 0 writes; every rank reads the file
(the directory must be shared between nodes, like the output directory).

Example::
    >>> ckpts = CheckpointManager(tmp_dir, keep=2)
    >>> ckpts.save({"step": 10, "model": model.state_dict()}, step=10, world_size=2)
    >>> path, manifest = ckpts.find_latest()
    >>> state = load_checkpoint(path)
"""

import hashlib
import json
import logging
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d+)\.json$")
# What a writer that stopped mid-save leaves: a temporary (see _atomic_write), or a .pt without its manifest.
_TEMPORARY = re.compile(r"^\.step_(\d+)\.(pt|json)\.tmp\d+$")
_WEIGHTS = re.compile(r"^step_(\d+)\.pt$")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary sibling, fsync, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


class CheckpointManager:
    """Save, list, prune and pick checkpoints in ``directory``."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep

    def save(self, state: dict, *, step: int, world_size: int) -> Path:
        """Write ``state`` atomically with its manifest; prune to the newest ``keep``. Rank 0 only."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step_{step:08d}.pt"
        _atomic_write(path, lambda f: torch.save(state, f))
        manifest = {
            "step": step,
            "world_size": world_size,
            "sha256": sha256_file(path),
            "file": path.name,
            "num_bytes": path.stat().st_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        self._prune()
        return path

    def manifests(self) -> list[Path]:
        """Manifest paths, newest step first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def find_latest(self) -> tuple[Path, dict] | None:
        """The newest complete, uncorrupted checkpoint and its manifest, or None.

        Every newer checkpoint that fails a check is logged in one warning line.
        """
        for manifest_path in self.manifests():
            try:
                manifest = json.loads(manifest_path.read_text())
                path = self.directory / manifest["file"]
                if not path.is_file():
                    raise ValueError(f"{manifest['file']} is missing")
                digest = sha256_file(path)
                if digest != manifest["sha256"]:
                    size, expected = path.stat().st_size, manifest.get("num_bytes")
                    raise ValueError(f"sha256 mismatch ({size} of {expected} bytes, truncated or corrupt)")
            except (ValueError, KeyError, TypeError, OSError) as e:
                log.warning("checkpoint %s is unusable: %s; trying the previous one", manifest_path.stem, e)
                continue
            found = path, manifest
            break
        else:
            found = None
        for step, path in self.incomplete_writes():
            if found is None or step > found[1]["step"]:
                log.warning("checkpoint step_%08d is unusable: %s is an incomplete write (the writer stopped "
                            "before its manifest); trying the previous one", step, path.name)
        return found

    def incomplete_writes(self) -> list[tuple[int, Path]]:
        """(step, path) of what an interrupted save left: temporaries and ``.pt`` files without a manifest."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            if m := _TEMPORARY.match(p.name):
                found.append((int(m.group(1)), p))
            elif (m := _WEIGHTS.match(p.name)) and not p.with_suffix(".json").exists():
                found.append((int(m.group(1)), p))
        return sorted(found, reverse=True)

    def _prune(self) -> None:
        for manifest_path in self.manifests()[self.keep :]:
            # Manifest first: a half-pruned checkpoint is never mistaken for a complete one.
            manifest_path.unlink(missing_ok=True)
            manifest_path.with_suffix(".pt").unlink(missing_ok=True)
        for _, path in self.incomplete_writes():  # called after a complete save: these are leftovers
            path.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, no code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Every random generator the training step may touch, as weights_only-safe values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
