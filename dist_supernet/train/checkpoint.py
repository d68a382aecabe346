"""Sharded, atomic checkpoints on ``torch.distributed.checkpoint`` (DCP), components as ``Stateful``.

One checkpoint is one directory that every rank writes into in parallel::

    step_00000100/
        __0_0.distcp     rank 0's items: its own m, b, RNG, byte counters, and its share of the model
        __1_0.distcp     rank 1's items (likewise)
        .metadata        DCP's index (a pickle; read through a restricted unpickler, see below)
        manifest.json    step, world size, writer, sha256 and size of every file above, the config

What goes in (``Trainer.checkpoint_components``):

- replicated components, identical on every rank, under one key each
  (``model``, ``optimizer`` for AdamW/SGD, ``scheduler``, ``sampler``,
  ``nonfinite``, ``extra`` = the supernet's arch sampler): DCP's save planner
  keeps ONE copy of each and spreads them over the ranks' files;
- per-rank components under ``rank00003`` etc.: each rank's RNG, byte
  counters and, with Birder, its own m and b (``Birder.rank_state()``, 8 bytes
  per parameter on every rank, never gathered anywhere). They are separate
  keys, not rows of one ``[world, T]`` tensor sharded by rank, because they
  are not shards of one thing: each is a whole state that only its rank can
  use, and a different world size needs whole rows by name (the mean
  fallback), not a re-slicing (see :meth:`CheckpointManager.load_mean`).

Atomic: every rank writes into ``.step_N.tmp-<writer>`` (the writer id is the
same on every rank of one job and across torchrun restarts of it); then each
rank hashes the files it wrote, rank 0 writes ``manifest.json`` last, fsyncs
and renames the directory to ``step_N`` (the commit point), then prunes. A
crash at any point leaves the previous checkpoint as it was.

Nothing in a checkpoint runs code on load. DCP itself unpickles ``.metadata``
with plain ``pickle.load`` and loads non-tensor items with
``torch.load(weights_only=False)`` (torch 2.13); both are replaced here:
``.metadata`` goes through :func:`~dist_supernet.train.untrusted.load_dcp_metadata`
(an unpickler that builds only DCP's own metadata classes, size-capped) and
non-tensor items through ``torch.load(weights_only=True)``. Before DCP reads
anything, the sha256 of every file is checked against the manifest (each rank
hashes a share of the files).

What is pruned: only this run's complete checkpoints beyond ``keep`` (oldest
first), and temporaries whose name carries this job's writer id (provably ours
and incomplete). "This run" is the lineage in every manifest (``run``): a fresh
job's own writer id, or, once it resumes from a checkpoint of this directory,
that checkpoint's lineage (so a requeued or rerun job keeps pruning what the
run wrote before). Another run's complete checkpoints, another writer's
temporary, a directory without manifest, a file of the older single-file
format: never deleted. A job that does not resume from this directory refuses
to start while another run's checkpoints are in it (:meth:`CheckpointManager.claim`).
A ``step_N`` directory without a manifest is verified by reading every item
(``weights_only``) and then used with a warning, or set aside as
``step_N.unusable-no-manifest``.

What the manifest says is checked against the checkpoint's own DCP index before
anything is loaded (world size, step, optimizer kind, the files the index
references), and :meth:`CheckpointManager.load` reads only what is present:
every item a component asks for and the checkpoint lacks is an explicit,
logged decision (an optional component starts fresh, a missing setting keeps
this run's value) or refuses the checkpoint (missing tensors or a required
component), never a silent partial load.

A save that fails (a full disk: ENOSPC) removes this job's temporary on the
way out and raises :class:`CheckpointWriteError`, one line naming the
directory, the free space and the size of the last checkpoint; the older
checkpoints are not touched.

Example::
    >>> ckpts = CheckpointManager(tmp_dir, keep=2)          # on every rank
    >>> ckpts.save({"model": ModelState(model)}, {"rng": RNGState()}, step=10)
    >>> found = ckpts.find_latest()                          # every rank gets the same answer
    >>> ckpts.load(found, {"model": ModelState(model)})
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import socket
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element

from dist_supernet.train.config import ConfigError, resume_path_problem
from dist_supernet.train.untrusted import MAX_MANIFEST_BYTES, load_dcp_metadata, one_line, read_json_capped

log = logging.getLogger(__name__)

FORMAT = "dist_supernet/dcp-1"
MANIFEST = "manifest.json"
METADATA = ".metadata"
_COMPLETE = re.compile(r"^step_(\d{8,})$")
# What this code itself leaves when a process dies mid-save or mid-prune; the writer id says whose.
_OURS = re.compile(r"^\.step_(\d{8,})\.(tmp|deleting)-([A-Za-z0-9_-]{1,80})$")
_LEGACY = re.compile(r"^step_(\d+)\.pt$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written or committed; the message is one line (raised on every rank)."""


def rank_key(rank: int) -> str:
    """The top-level key of one rank's own components, e.g. ``rank00003``."""
    return f"rank{rank:05d}"


def node_key(node: int) -> str:
    """The top-level key of one node's components (a replica between syncs, saved once by its ranks), e.g. ``node00001``."""
    return f"node{node:05d}"


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a rename survives a power loss only once its directory is synced
    finally:
        os.close(fd)


# -- collectives that also work without a process group (unit tests, tools) ---------------------


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _dist() else (0, 1)


def _broadcast(obj, src: int = 0):
    if not _dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _all_gather(obj) -> list:
    if not _dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -- components ---------------------------------------------------------------------------------


class StatefulGroup:
    """Several ``Stateful`` parts under one key (DCP calls ``state_dict`` only on top-level values)."""

    def __init__(self, parts: dict):
        self.parts = parts

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            if name in state:  # a part an older checkpoint lacks keeps its current state
                part.load_state_dict(state[name])


class ModelState:
    """``Stateful`` model: DCP loads the tensors in place into the live parameters and buffers."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class TorchOptimizerState:
    """``Stateful`` torch optimizer (AdamW, SGD), replicated: its state is the same on every rank.

    DCP turns the integer keys of ``state`` into strings; they are turned back here.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        # As a load target: what a fresh AdamW lacks (it has no per-parameter state yet) is
        # rebuilt from the checkpoint's metadata by _SafeLoadPlanner.
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        state["state"] = {int(k): v for k, v in (state.get("state") or {}).items()}
        self.optimizer.load_state_dict(state)


class BirderRankState:
    """``Stateful`` Birder state of THIS rank: m, b (``rank_state()``) and the rest of its state_dict.

    m and b are loaded in place into the live tensors ``rank_state()`` returns, then
    handed to ``load_rank_state`` (so a copy-returning ``rank_state`` works too).
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return {**self.optimizer.rank_state(), "meta": self.meta()}

    def meta(self) -> dict:
        """``Birder.state_dict()`` without the per-parameter m, b (``rank_state`` holds them)."""
        state = self.optimizer.state_dict()
        state["state"] = {k: {n: v for n, v in s.items() if n not in ("m", "b")}
                          for k, s in (state.get("state") or {}).items()}
        return state

    def load_meta(self, meta: dict) -> None:
        # Load over the live state dict, so per-parameter entries this meta lacks (m, b) keep
        # their place; load_rank_state then sets m and b.
        live = self.optimizer.state_dict()
        saved_state = {int(k): v for k, v in (meta.get("state") or {}).items()}
        for k, entries in saved_state.items():
            live.setdefault("state", {}).setdefault(k, {}).update(entries)
        live.update({k: v for k, v in meta.items() if k != "state"})
        self.optimizer.load_state_dict(live)

    def load_state_dict(self, state: dict) -> None:
        self.load_meta(state.get("meta") or {})
        if "m" in state:  # FSDP2: m, b come per replica instead (Birder.replica_state)
            self.optimizer.load_rank_state({"m": state["m"], "b": state["b"]})


class RNGState:
    """``Stateful`` RNG of this process: torch (and CUDA), Python's ``random``, NumPy."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


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


# -- reading safely -----------------------------------------------------------------------------


class _SafeReader(FileSystemReader):
    """DCP's reader with the metadata already read by :func:`load_dcp_metadata` (never ``pickle.load``)."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self._metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with ``weights_only`` for non-tensor items, rebuilding what a target lacks.

    ``rebuild``: key paths (tuples) under which every saved item missing from the target is
    created from the metadata (an empty tensor of the saved shape and dtype, or a placeholder
    for a non-tensor value), as torch's ``_EmptyStateDictLoadPlanner`` does for a whole checkpoint.

    ``absent_ok``: the target's keys the checkpoint may lack (each one decided and logged by
    :meth:`CheckpointManager.load`); DCP skips them and they keep their current value. Any
    other missing key raises: a partial load is never silent.
    """

    def __init__(self, rebuild: list[tuple] = (), absent_ok: frozenset = frozenset()):
        super().__init__(allow_partial_load=True)  # only for absent_ok: set_up_planner refuses the rest
        self.rebuild = [tuple(p) for p in rebuild]
        self.absent_ok = absent_ok

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        present = set(flatten_state_dict(state_dict)[0])
        for fqn, item in metadata.state_dict_metadata.items():
            path = tuple((metadata.planner_data or {}).get(fqn, (fqn,)))
            if fqn in present or not any(path[: len(p)] == p for p in self.rebuild):
                continue
            value = torch.empty(item.size, dtype=item.properties.dtype) if isinstance(
                item, TensorStorageMetadata) else None
            set_element(state_dict, path, value)
        leaves = {fqn for fqn, v in flatten_state_dict(state_dict)[0].items()
                  if not (isinstance(v, (dict, list, tuple)) and len(v) == 0)}  # nothing to read into
        undecided = sorted(leaves - set(metadata.state_dict_metadata) - self.absent_ok)
        if undecided:
            raise ValueError(f"the checkpoint lacks {undecided[0]} ({len(undecided)} missing item(s) in all)")
        super().set_up_planner(state_dict, metadata, is_coordinator)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        # DefaultLoadPlanner uses weights_only=False here: a crafted item would run code.
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                    torch.load(value, weights_only=True))


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint found or opened for loading; every rank holds the same one."""

    path: Path
    step: int
    world_size: int
    manifest: dict | None  # None: a step_N directory without manifest, verified by reading it
    metadata: Metadata = dataclasses.field(repr=False)
    key: str = "trainer.resume"  # the config key and value that picked it, for one-line errors
    value: object = "auto"

    @property
    def lineage(self) -> str | None:
        """The run this checkpoint belongs to (manifest ``run``; older manifests: their writer), None if unknown."""
        manifest = self.manifest or {}
        value = manifest.get("run") or manifest.get("writer")
        return value if isinstance(value, str) else None

    @property
    def optimizer_kind(self) -> str | None:
        """What the index says the optimizer state is (:func:`index_optimizer`)."""
        return index_optimizer(self.metadata)

    @property
    def config(self) -> dict:
        """The resolved config the checkpoint was written with ({} if unknown)."""
        config = (self.manifest or {}).get("config")
        return config if isinstance(config, dict) else {}

    def model_path(self) -> tuple[str, ...]:
        """Where the model's tensors are: ``("model",)``, or node 0's replica of a sync run (``node00000``, ``model``)."""
        return ("model",) if self.shapes("model") else (node_key(0), "model")

    def shapes(self, *prefix: str) -> dict[str, list[int]]:
        """Saved tensor shapes under one key path (default ``model``; ``node00000``, ``model``), by their name inside it."""
        prefix = prefix or ("model",)
        found = {}
        for fqn, item in self.metadata.state_dict_metadata.items():
            path = tuple(str(p) for p in (self.metadata.planner_data or {}).get(fqn, (fqn,)))
            if path[:len(prefix)] == prefix and isinstance(item, TensorStorageMetadata):
                found[".".join(path[len(prefix):])] = list(item.size)
        return found


def _index_ranks(metadata: Metadata) -> set[int]:
    """The ranks whose own components (``rank<r>.``) the index holds."""
    return {int(m.group(1)) for fqn in metadata.state_dict_metadata if (m := re.match(r"^rank(\d{5})\.", fqn))}


def _world_size_from_keys(metadata: Metadata) -> int:
    ranks = _index_ranks(metadata)
    return max(ranks) + 1 if ranks else 1


def index_optimizer(metadata: Metadata) -> str | None:
    """The optimizer whose state the index holds: ``birder`` (per-rank m, b), ``adamw``, ``sgd``, or None.

    Read from the key names alone (no item is read): Birder's m and b sit under each
    rank's key (``rank00000.optimizer.m``; with FSDP2 under ``birder_replica000``, and each
    rank keeps its Birder meta); AdamW's and SGD's state is replicated under
    ``optimizer`` (under each node's ``node00001.optimizer`` with ``sync=diloco``) and their param
    groups carry ``betas`` or ``momentum``.
    """
    keys = metadata.state_dict_metadata
    if any(re.match(r"^(rank\d{5}\.optimizer\.m|rank\d{5}\.optimizer\.meta\.birder\.step|birder_replica\d+\..*)$", fqn)
           for fqn in keys):  # DDP: each rank's m, b; FSDP2: per replica (Birder.replica_state)
        return "birder"
    # sync=diloco stores the optimizer once per node (node00000.optimizer...)
    if any(re.match(r"^(node\d{5}\.)?optimizer\.param_groups\.\d+\.betas$", fqn) for fqn in keys):
        return "adamw"
    if any(re.match(r"^(node\d{5}\.)?optimizer\.param_groups\.\d+\.momentum$", fqn) for fqn in keys):
        return "sgd"
    return None


def _manifest_vs_index(path: Path, manifest: dict, metadata: Metadata) -> str | None:
    """The first manifest field the loader uses that the checkpoint's own index contradicts, or None.

    The manifest is a claim about the files (whoever edits or crafts one can say anything);
    the index is what DCP will read. Checked: every file the index references is listed
    (so hashed), the world size is the set of ranks whose own components are stored, the
    step is the directory's, and the recorded optimizer is the one whose state is stored.
    """
    listed = set(manifest.get("files") or {})
    referenced = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    unlisted = [name for name in referenced if name not in listed]
    if unlisted:
        return f"its index references {unlisted[0]}, which {MANIFEST} does not list (its bytes are unverified)"
    world = int(manifest["world_size"])
    ranks = _index_ranks(metadata)
    if ranks != set(range(world)):
        held = f"ranks {min(ranks)}..{max(ranks)} ({len(ranks)})" if ranks else "no rank's"
        return f"{MANIFEST} says world_size {world}, its index holds the own state of {held}"
    named = _COMPLETE.match(path.name)
    if named and int(named.group(1)) != int(manifest["step"]):
        return f"{MANIFEST} says step {manifest['step']}, the directory is {path.name}"
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    recorded = (config.get("optim") or {}).get("name") if isinstance(config.get("optim"), dict) else None
    stored = index_optimizer(metadata)
    if recorded is not None and stored is not None and recorded != stored:
        return f"{MANIFEST} says optim={recorded}, its index holds {stored} state"
    return None


def _verify_files(directory: Path, files: dict) -> str | None:
    """The first problem with this rank's share of ``files`` ({name: {sha256, num_bytes}}), or None."""
    rank, world = _rank_world()
    for i, (name, info) in enumerate(sorted(files.items())):
        if i % world != rank:
            continue
        path = directory / name
        if "/" in name or name.startswith(".."):
            return f"manifest names a file outside the checkpoint: {name!r}"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != info.get("num_bytes") or sha256_file(path) != info.get("sha256"):
            return f"sha256 mismatch in {name} ({size} of {info.get('num_bytes')} bytes, truncated or corrupt)"
    return None


def _verify_by_reading(directory: Path, metadata: Metadata) -> str | None:
    """No manifest: read this rank's share of the items (each alone, ``weights_only``); first problem or None."""
    rank, world = _rank_world()
    by_file: dict[str, list] = {}
    for index, info in (metadata.storage_data or {}).items():
        by_file.setdefault(info.relative_path, []).append((index, info))
    for i, (name, items) in enumerate(sorted(by_file.items())):
        if i % world != rank:
            continue
        path = directory / name
        if "/" in name or not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                for index, info in items:
                    if info.offset + info.length > size:
                        return f"{name} is truncated ({size} bytes, {index.fqn} ends at {info.offset + info.length})"
                    f.seek(info.offset)
                    torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (any refusal: corrupt, truncated, not weights_only)
            return f"{name}: item unreadable ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
    return None


# Components a checkpoint may lack (an older writer, another trainer) without losing the resume:
# each starts fresh, and says so in one line. Everything else must be present.
OPTIONAL_COMPONENTS = {
    "nonfinite": "the non-finite step counters start at 0",
    "extra": "the trainer's extra state (e.g. a supernet's arch sampler) starts fresh",
    "rng": "fresh random generators: the resume is not bit-identical",
    "comm_stats": "the byte counters start at 0",
}


class CheckpointManager:
    """Save, find, load and prune the checkpoints in ``directory``; every method is called on every rank.

    Args:
        directory: shared by all ranks (and nodes), like the output directory.
        keep: complete checkpoints kept (newest first).
        async_save: write with ``dcp.async_save`` in a background thread on a separate
            gloo group; the commit (hashes, manifest, rename) happens at the next ``save``
            or ``wait``.
    """

    def __init__(self, directory: str | Path, keep: int = 3, *, async_save: bool = False):
        self.directory = Path(directory)
        self.keep = keep
        self.rank, self.world_size = _rank_world()
        # One id for every rank of this job and its torchrun restarts (TORCHELASTIC_RUN_ID is
        # the rendezvous id); it names our temporaries, so only ours are ever pruned.
        run_id = os.environ.get("TORCHELASTIC_RUN_ID") or uuid.uuid4().hex[:12]
        writer = re.sub(r"[^A-Za-z0-9_-]", "-", f"{socket.gethostname()}-{run_id}")[:80]
        self.writer = _broadcast(writer)
        self.run = self.writer  # this run's lineage until claim() adopts the one it resumes (see the module doc)
        self.async_save = async_save and _dist()
        # DCP's background upload does collectives (plan gather) while training does its own:
        # a group of its own keeps the two streams apart (what torchtitan does too).
        self._async_group = dist.new_group(backend="gloo") if self.async_save else None
        self._pending: tuple[Future, Path, Path, int, dict] | None = None

    # -- saving -------------------------------------------------------------------------------

    def save(self, replicated: dict, per_rank: dict | None = None, *, step: int, manifest: dict | None = None,
             blocking: bool = True) -> Path:
        """Write one checkpoint: ``replicated`` once, ``per_rank`` under this rank's key. Collective.

        ``manifest``: extra JSON-able entries for manifest.json (the config, wall time).
        Returns the final path (with ``blocking=False`` and async_save: where it will be).
        Raises :class:`CheckpointWriteError` (one line, every rank) when it cannot be written;
        this job's temporary is removed then, the older checkpoints are untouched.
        """
        self.wait()
        tmp = self.directory / f".step_{step:08d}.tmp-{self.writer}"
        final = self.directory / f"step_{step:08d}"
        error = None
        if self.rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                if tmp.exists():  # ours, from an attempt that died at this step: incomplete by name
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as e:
                error = self._write_failure(final, tmp, e)
        error = _broadcast(error)
        if error:
            raise CheckpointWriteError(error)
        state = {**replicated, rank_key(self.rank): StatefulGroup(per_rank or {})}
        writer = FileSystemWriter(tmp, sync_files=True, overwrite=False)
        extra = dict(manifest or {}, step=step)
        if self.async_save and not blocking:
            future = dcp.async_save(state, storage_writer=writer, process_group=self._async_group)
            self._pending = (future, tmp, final, step, extra)
            return final
        try:
            dcp.save(state, storage_writer=writer, no_dist=not _dist())
        except (CheckpointException, OSError) as e:  # CheckpointException (a BaseException): any rank's failure
            self._raise_write_failure(final, tmp, e)
        return self._commit(tmp, final, step, extra)

    def wait(self) -> None:
        """Finish a pending asynchronous save (wait for its files, then commit). Collective."""
        if self._pending is None:
            return
        future, tmp, final, step, extra = self._pending
        self._pending = None
        try:
            future.result()
        except (CheckpointException, OSError) as e:
            self._raise_write_failure(final, tmp, e)
        self._commit(tmp, final, step, extra)

    def _raise_write_failure(self, final: Path, tmp: Path, error: BaseException) -> None:
        """Every rank after a failed write (DCP raises on all of them): rank 0 words it and removes the temporary."""
        message = None
        if self.rank == 0:
            try:
                message = self._write_failure(final, tmp, error)
            except Exception as e:  # noqa: BLE001 (the other ranks wait for a line: never fail to send one)
                message = f"checkpoint {final.name} could not be written: {one_line(error)} ({e} while cleaning up)"
        raise CheckpointWriteError(_broadcast(message)) from None

    def _write_failure(self, final: Path, tmp: Path, error: BaseException) -> str:
        """Rank 0: one line for a failed save, after removing this job's temporary ``tmp``.

        A full disk shows up as ENOSPC only sometimes (torch.save into DCP's stream reports
        "unexpected pos 704 vs 598" instead): the free space is measured here, before the
        temporary is removed, and a filesystem with less room than the last checkpoint took
        is named ENOSPC too.
        """
        last = self._last_checkpoint_bytes()
        try:
            stats = os.statvfs(self.directory)
            free = stats.f_bavail * stats.f_frsize
        except OSError:
            free = None
        written = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        removed = "removed" if not tmp.exists() else "could not be removed"
        older = [p.name for p in sorted(self.directory.iterdir()) if _COMPLETE.match(p.name)] \
            if self.directory.is_dir() else []
        kept = f"the older checkpoints are intact ({', '.join(older)})" if older else "no older checkpoint exists"
        full = _is_enospc(error) or (free is not None and last is not None and free < last)
        if full:
            size = (f"the last checkpoint took {_size(last)}" if last is not None
                    else f"no earlier checkpoint here; {_size(written)} were written before the failure")
            return (f"checkpoint {final.name} could not be written: ENOSPC (no space left on device) in "
                    f"{self.directory}: {size}, {_size(free) if free is not None else 'unknown'} free; this job's "
                    f"temporary {tmp.name} {removed}, {kept}")
        return (f"checkpoint {final.name} could not be written: {one_line(error)}; this job's temporary {tmp.name} "
                f"{removed}, {kept}")

    def _last_checkpoint_bytes(self) -> int | None:
        """Bytes of the newest complete checkpoint here (its manifest's file sizes), None if there is none."""
        complete = sorted(((int(m.group(1)), p) for p in self.directory.iterdir()
                           if (m := _COMPLETE.match(p.name)) and (p / MANIFEST).is_file()), reverse=True) \
            if self.directory.is_dir() else []
        for _, path in complete:
            try:
                files = read_json_capped(path / MANIFEST, MAX_MANIFEST_BYTES)["files"]
                return sum(int(f["num_bytes"]) for f in files.values()) + (path / MANIFEST).stat().st_size
            except (ValueError, KeyError, TypeError, OSError):
                continue
        return None

    def _commit(self, tmp: Path, final: Path, step: int, extra: dict) -> Path:
        """Hash, manifest last, rename, prune. Collective: the files are complete on every rank."""
        mine = {p.name: {"sha256": sha256_file(p), "num_bytes": p.stat().st_size}
                for p in sorted(tmp.iterdir()) if p.name.startswith(f"__{self.rank}_")
                or (self.rank == 0 and p.name == METADATA)}
        files = {name: info for part in _all_gather(mine) for name, info in part.items()}
        error = None
        if self.rank == 0:
            try:
                manifest = {"format": FORMAT, "step": step, "world_size": self.world_size, "writer": self.writer,
                            "run": self.run, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra, "files": files}
                with open(tmp / MANIFEST, "w") as f:
                    f.write(json.dumps(manifest, indent=1, default=str))
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(tmp)
                if final.exists():  # e.g. resumed from an earlier step of this directory: keep, never overwrite
                    aside = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
                    log.warning("checkpoint %s already exists: set aside as %s", final.name, aside.name)
                    os.rename(final, aside)
                os.rename(tmp, final)  # the commit point
            except OSError as e:
                error = self._write_failure(final, tmp, e).replace("could not be written", "could not be committed")
            if error is None:
                try:
                    _fsync_dir(self.directory)
                    self._prune()
                except OSError as e:  # committed: a failed prune loses nothing, it only keeps more
                    log.warning("checkpoint %s written; pruning older ones failed: %s", final.name, e)
        error = _broadcast(error)
        if error:
            raise CheckpointWriteError(error)
        return final

    def _prune(self) -> None:
        """Rank 0: this run's complete checkpoints beyond ``keep``, and this job's leftovers; nothing else."""
        ours = []
        for p in self.directory.iterdir():
            if (m := _COMPLETE.match(p.name)) and (p / MANIFEST).is_file() and _lineage(p) == self.run:
                ours.append((int(m.group(1)), p))
        for step, path in sorted(ours, reverse=True)[self.keep :]:
            # Rename first: a crash mid-delete leaves a name that says "ours, being deleted".
            doomed = path.with_name(f".{path.name}.deleting-{self.writer}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        for path in self.directory.iterdir():
            m = _OURS.match(path.name)
            if m and m.group(3) == self.writer and not (self._pending and path == self._pending[1]):
                shutil.rmtree(path, ignore_errors=True)

    # -- whose checkpoints ------------------------------------------------------------------

    def others(self) -> list[tuple[int, str, str]]:
        """(step, name, whose) of the checkpoints here that are not this run's, newest first. Rank 0, no collective.

        Complete ones of another lineage, and ``step_N`` directories without a manifest
        (their run is unknown). Temporaries and set-aside directories are not checkpoints.
        """
        found = []
        for p in self.directory.iterdir() if self.directory.is_dir() else []:
            if not ((m := _COMPLETE.match(p.name)) and p.is_dir()):
                continue
            if (p / MANIFEST).is_file():
                lineage = _lineage(p)
                if lineage != self.run:
                    found.append((int(m.group(1)), p.name, f"run {lineage}" if lineage else "an unreadable manifest"))
            elif (p / METADATA).is_file():
                found.append((int(m.group(1)), p.name, "no manifest, run unknown"))
        return sorted(found, reverse=True)

    def claim(self, resumed: "Checkpoint | None", key: str = "trainer.resume", value="auto") -> None:
        """Decide, before training, what this job does with the checkpoints already here. Collective.

        ``resumed``: the checkpoint this job resumes from (its full state; a weights-only
        load is not a resume), or None. Resumed from this directory: the job continues
        that run (adopts its lineage, so retention keeps pruning it) and any other run's
        checkpoints here are left alone, with one warning line. Not resumed from here
        while another run's checkpoints are here: ConfigError (one line, every rank),
        because the two runs' ``step_N`` names would collide and ``trainer.resume=auto``
        (torchrun's restarts, a requeue) would later pick whichever step is highest.
        """
        here = resumed is not None and resumed.path.parent.resolve() == self.directory.resolve()
        if here and resumed.lineage:
            self.run = resumed.lineage  # the same on every rank: every rank opened the same manifest
        others = _broadcast([o for o in self.others() if not (here and o[1] == resumed.path.name)]
                            if self.rank == 0 else None)
        if not others:
            return
        step, name, whose = others[0]
        runs = len({w for _, _, w in others})
        listed = (f"{len(others)} checkpoint{'s' if len(others) > 1 else ''} of "
                  f"{'another run' if runs == 1 else f'{runs} other runs'} (newest {name}, {whose})")
        if here:
            if self.rank == 0:
                log.warning("%s also holds %s: left alone, never pruned", self.directory, listed)
            return
        raise ConfigError(key, value, f"{self.directory} holds {listed}; a run that does not resume from them would "
                                      "mix its checkpoints with theirs: resume that run (trainer.resume=auto), choose "
                                      "another hydra.run.dir (or trainer.checkpoint_dir), or move them out")

    # -- finding ------------------------------------------------------------------------------

    def find_latest(self, key: str = "trainer.resume", value="auto") -> Checkpoint | None:
        """The newest usable checkpoint (the same on every rank), or None. Collective.

        Every newer one that fails is reported in one warning line (rank 0). A newest file of
        the older single-file format stops the job (ConfigError): resuming older work silently
        from scratch would lose it.
        """
        candidates = _broadcast(self._candidates() if self.rank == 0 else None)
        for step, name, kind in candidates:
            path = self.directory / name
            if kind == "legacy":
                raise ConfigError(key, value, _legacy_message(path))
            if kind == "temporary":
                if self.rank == 0:
                    whose = "this job's" if name.endswith(f"-{self.writer}") else "another writer's"
                    log.warning("checkpoint step_%08d is unusable: %s is an incomplete write (%s; the writer "
                                "stopped before its manifest); trying the previous one", step, name, whose)
                continue
            found, problem = self._open(path)
            if found is not None:
                found.key, found.value = key, value
                return found
            if self.rank == 0:
                log.warning("checkpoint %s is unusable: %s; trying the previous one", name, problem)
                if kind == "no-manifest":
                    aside = path.with_name(f"{name}.unusable-no-manifest")
                    os.rename(path, aside)
                    log.warning("checkpoint %s set aside as %s (not deleted)", name, aside.name)
        return None

    def _candidates(self) -> list[tuple[int, str, str]]:
        """(step, name, kind) newest first: complete, no-manifest, temporary, legacy."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            if (m := _COMPLETE.match(p.name)) and p.is_dir():
                kind = "complete" if (p / MANIFEST).is_file() else "no-manifest" if (p / METADATA).is_file() else None
                if kind is None:
                    continue  # an empty step_N directory holds nothing to resume
                found.append((int(m.group(1)), p.name, kind))
            elif (m := _OURS.match(p.name)) and m.group(2) == "tmp":
                found.append((int(m.group(1)), p.name, "temporary"))
            elif (m := _LEGACY.match(p.name)) and p.is_file():
                found.append((int(m.group(1)), p.name, "legacy"))
        order = {"complete": 0, "no-manifest": 1, "temporary": 2, "legacy": 3}
        return sorted(found, key=lambda t: (-t[0], order[t[2]]))

    def open(self, path: Path, key: str = "trainer.resume", value=None) -> Checkpoint:
        """An explicit checkpoint (``trainer.resume=<path>``), checked like any other; ConfigError if unusable."""
        path = Path(path)
        if path.is_file():
            inside = resume_path_problem(str(path))
            raise ConfigError(key, value if value is not None else str(path), inside or _legacy_message(path))
        found, problem = self._open(path)
        value = value if value is not None else str(path)
        if found is None:
            raise ConfigError(key, value, f"{path.name} is unusable: {problem}")
        found.key, found.value = key, value
        return found

    def _open(self, path: Path) -> tuple[Checkpoint | None, str | None]:
        """Verify a checkpoint directory on every rank (each hashes a share); (checkpoint, None) or (None, why)."""
        manifest, problem = None, None
        if (path / MANIFEST).is_file():
            try:
                manifest = read_json_capped(path / MANIFEST, MAX_MANIFEST_BYTES)
                if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                    raise ValueError(f"not a {FORMAT} manifest")
                if not isinstance(manifest.get("files"), dict) or METADATA not in manifest["files"]:
                    raise ValueError("the manifest lists no files")
                int(manifest["step"]), int(manifest["world_size"])
            except (ValueError, KeyError, TypeError, OSError, RecursionError) as e:
                problem = f"{MANIFEST} is unreadable ({e})"
            if problem is None:
                problem = _verify_files(path, manifest["files"])
        elif not (path / METADATA).is_file():
            problem = f"neither {MANIFEST} nor {METADATA} in it"
        problem = next((p for p in _all_gather(problem) if p), None)
        metadata = None
        if problem is None:
            try:  # every byte was checked against the manifest (if any); still: no code on load
                metadata = load_dcp_metadata(path / METADATA)
            except ValueError as e:
                problem = str(e)
        if problem is None and manifest is not None:
            problem = _manifest_vs_index(path, manifest, metadata)
        if problem is None and manifest is None:
            problem = next((p for p in _all_gather(_verify_by_reading(path, metadata)) if p), None)
        if problem is not None:
            return None, problem
        step = int(manifest["step"]) if manifest else int(_COMPLETE.match(path.name).group(1)) if _COMPLETE.match(
            path.name) else 0
        world = int(manifest["world_size"]) if manifest else _world_size_from_keys(metadata)
        if manifest is None and self.rank == 0:
            log.warning("checkpoint %s has no %s: every item was read back (weights_only) and is used; its recipe "
                        "and digests cannot be checked", path.name, MANIFEST)
        return Checkpoint(path=path, step=step, world_size=world, manifest=manifest, metadata=metadata), None

    # -- loading ------------------------------------------------------------------------------

    def load(self, found: Checkpoint, components: dict, *, rebuild: list[tuple] | None = None) -> None:
        """Load ``components`` ({top-level key: Stateful or dict}) from ``found``. Collective.

        Tensors a component's ``state_dict()`` returns are loaded in place; anything it
        lacks is rebuilt from the checkpoint's metadata (under ``rebuild``: key paths,
        default every component's whole key); then its ``load_state_dict`` runs. Only
        what the checkpoint holds is read; what it lacks is decided by :meth:`absent`
        (logged, or ConfigError) before anything is read.
        """
        statefuls = {k: v for k, v in components.items() if hasattr(v, "load_state_dict")}
        targets = {k: (v.state_dict() if k in statefuls else v) for k, v in components.items()}
        absent_ok = self.absent(found, targets)
        try:
            dcp.load(targets, storage_reader=_SafeReader(found.path, found.metadata),
                     planner=_SafeLoadPlanner(rebuild=[(k,) for k in targets] if rebuild is None else rebuild,
                                              absent_ok=absent_ok),
                     no_dist=not _dist())
        except (Exception, CheckpointException) as e:  # noqa: BLE001 (DCP wraps each rank's failure; a BaseException)
            raise ConfigError(found.key, found.value, f"{found.path.name} could not be loaded: {one_line(e)}") from None
        for k, v in statefuls.items():
            v.load_state_dict(targets[k])
        for k, v in components.items():
            if k not in statefuls and isinstance(v, dict):
                v.update(targets[k])

    def absent(self, found: Checkpoint, targets: dict) -> frozenset:
        """What ``targets`` asks for and ``found`` lacks, decided item by item; returns the keys allowed absent.

        - a component of :data:`OPTIONAL_COMPONENTS` (top-level or under a rank's key) that the
          checkpoint lacks entirely starts fresh (its current state), one warning line says so;
        - a setting (a non-tensor item) missing from a present component, e.g. a param-group
          option a newer torch added, keeps this run's value, named in the same line;
        - anything else missing (a tensor, or a whole required component such as the model,
          the optimizer, the schedule, the data position or the step) refuses the checkpoint:
          ConfigError naming the first missing key.
        """
        saved = set(found.metadata.state_dict_metadata)

        def has(prefix: str) -> bool:
            return any(fqn == prefix or fqn.startswith(prefix + ".") for fqn in saved)

        # What the targets ask for: their leaves, less empty containers (an empty dict to be filled
        # from the checkpoint, e.g. a fresh AdamW's state or a trainer's empty extra state).
        flat, _ = flatten_state_dict(targets)
        wanted = {fqn: v for fqn, v in flat.items() if not (isinstance(v, (dict, list, tuple)) and len(v) == 0)}
        optional = {}
        for top, target in targets.items():
            for name, why in OPTIONAL_COMPONENTS.items():
                if top == name or (re.match(r"^rank\d{5}$", top) and isinstance(target, dict) and name in target):
                    optional[name if top == name else f"{top}.{name}"] = why
        fresh = {prefix: why for prefix, why in optional.items()
                 if not has(prefix) and any(f == prefix or f.startswith(prefix + ".") for f in wanted)}
        for top in targets:
            if not has(top) and top not in fresh and any(f == top or f.startswith(top + ".") for f in wanted):
                raise ConfigError(found.key, found.value,
                                  f"{found.path.name} lacks {top} entirely: it cannot be resumed "
                                  "(trainer.resume_weights_only=true loads its weights)")
        absent_ok, kept = set(), []
        for fqn, value in wanted.items():
            if has(fqn):  # saved as is, or a container the planner fills from the checkpoint
                continue
            absent_ok.add(fqn)
            if any(fqn == p or fqn.startswith(p + ".") for p in fresh):
                continue
            if isinstance(value, torch.Tensor):
                raise ConfigError(found.key, found.value, f"{found.path.name} lacks {fqn} (a tensor, shape "
                                                          f"{list(value.shape)}): that state cannot be resumed")
            kept.append(fqn)
        if fresh or kept:
            parts = [f"{prefix} is absent: {why}" for prefix, why in fresh.items()]
            if kept:
                parts.append(f"{', '.join(kept[:5])}{f' and {len(kept) - 5} more' if len(kept) > 5 else ''} "
                             f"absent: this run's value{'s are' if len(kept) > 1 else ' is'} kept")
            log.log(logging.WARNING if self.rank == 0 else logging.INFO, "checkpoint %s: %s", found.path.name,
                    "; ".join(parts))
        return frozenset(absent_ok)

    def load_mean(self, found: Checkpoint, path: tuple, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean over the saved ranks of ``rank<r>.<path>.<name>`` for each tensor name in ``like``. Collective.

        No rank holds more than its own sum and one saved row at a time: rank ``k`` of
        this job reads the saved rows ``r`` with ``r % world_size == k`` (DCP without
        collectives, so ranks may read different numbers of rows), then one all-reduce
        of the sums.
        """
        sums = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in like.items()}
        for r in range(self.rank, found.world_size, self.world_size):
            row = {n: torch.empty_like(t, dtype=torch.float32) for n, t in like.items()}
            target: dict = {}
            set_element(target, (rank_key(r), *path), row)
            dcp.load(target, storage_reader=_SafeReader(found.path, found.metadata),
                     planner=_SafeLoadPlanner(), no_dist=True)
            for n in sums:
                sums[n] += row[n]
        if _dist():
            for t in sums.values():
                dist.all_reduce(t)
        return {n: t / found.world_size for n, t in sums.items()}


    def load_replica_mean(self, found: Checkpoint, prefix: str, like: dict) -> None:
        """Set ``like`` (nested dicts of DTensors, this rank's replica state) to the mean over the saved
        ``<prefix>NNN`` keys, each resharded by DCP to this layout. Collective (every rank, same keys)."""
        saved = sorted({str(path[0]) for fqn in found.metadata.state_dict_metadata
                        for path in [(found.metadata.planner_data or {}).get(fqn, (fqn,))]
                        if str(path[0]).startswith(prefix)})
        if not saved:
            raise ConfigError(found.key, found.value, f"{found.path.name} holds no {prefix}* state of Birder's m, b")
        flat, _ = flatten_state_dict(like)
        sums = {k: torch.zeros_like(_local_of(t)) for k, t in flat.items()}
        for key in saved:
            row = {k: _empty_like_dtensor(t) for k, t in flat.items()}
            target: dict = {}
            for k, t in row.items():
                set_element(target, (key, *k.split(".")), t)
            self.load(found, {key: target[key]})
            for k in sums:
                sums[k] += _local_of(row[k])
        for k, t in flat.items():
            _local_of(t).copy_(sums[k] / len(saved))


def _local_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _empty_like_dtensor(tensor: torch.Tensor) -> torch.Tensor:
    """A zero tensor laid out like ``tensor`` (a DTensor: same mesh, placements and global shape)."""
    if not hasattr(tensor, "to_local"):
        return torch.zeros_like(tensor)
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(torch.zeros_like(tensor.to_local()), tensor.device_mesh, tensor.placements,
                              shape=tensor.shape, stride=tensor.stride(), run_check=False)


def _lineage(path: Path) -> str | None:
    """The run a complete checkpoint directory belongs to, from its manifest (None if unreadable)."""
    try:
        manifest = read_json_capped(path / MANIFEST, MAX_MANIFEST_BYTES)
    except (ValueError, OSError, RecursionError):
        return None
    value = manifest.get("run") or manifest.get("writer") if isinstance(manifest, dict) else None
    return value if isinstance(value, str) else None


def _is_enospc(error: BaseException) -> bool:
    """ENOSPC anywhere in ``error``: its cause chain, DCP's per-rank failures, or the text."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # DCP: rank -> exception (or a tuple with it)
            todo += [f for f in (failure if isinstance(failure, tuple) else (failure,)) if isinstance(f, BaseException)]
    return False


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"


def _legacy_message(path: Path) -> str:
    return (f"{path.name} is a single-file checkpoint of an older dist_supernet (before the sharded "
            f"torch.distributed.checkpoint layout); this version does not load it: resume it with the version "
            f"that wrote it, or move it out of {path.parent} to start fresh")


def read_checkpoint(path: str | Path) -> dict:
    """The whole checkpoint as one nested dict in this process (tests, inspection); no process group.

    Checked like any load: digests against the manifest, restricted metadata, ``weights_only``.

    Example::
        >>> state = read_checkpoint("outputs/run/checkpoints/step_00000040")
        >>> state["model"]["net.0.weight"].shape, state["rank00001"]["optimizer"]["m"].shape
    """
    path = Path(path)
    manifest = read_json_capped(path / MANIFEST, MAX_MANIFEST_BYTES) if (path / MANIFEST).is_file() else None
    if manifest is not None:
        for name, info in manifest["files"].items():
            if sha256_file(path / name) != info["sha256"]:
                raise ValueError(f"{path.name}/{name}: sha256 mismatch")
    metadata = load_dcp_metadata(path / METADATA)
    # DCP hands back only the top-level keys it was given: name them all, the planner fills them.
    state: dict = {p[0]: {} for p in (metadata.planner_data or {}).values()}
    dcp.load(state, storage_reader=_SafeReader(path, metadata), planner=_SafeLoadPlanner(rebuild=[()]),
             no_dist=True)
    return state


def dcp_file_sizes(path: str | Path) -> dict[str, int]:
    """Bytes of every data file of a checkpoint directory (``__<rank>_<i>.distcp``, ``.metadata``)."""
    return {p.name: p.stat().st_size for p in sorted(Path(path).iterdir()) if p.name != MANIFEST}

