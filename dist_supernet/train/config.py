"""Schemas for the ``conf/`` groups and the checks that make a wrong value fail at start.

Every check raises :class:`ConfigError`, whose message is one line naming the
dotted key and the value, e.g. ``optim.lr=-1.0: must be > 0``. The entry point
prints it as ``error: ...`` on every rank and exits with status 2, before any
process group exists (so no rank waits on another).

Three stages, all before training:

- :func:`check_group_choices` on the command line, before Hydra composes, so
  that ``compression=typo`` is one line instead of Hydra's listing;
- :func:`validate` on the composed config: types, ranges, combinations;
  it first imports the config's ``plugins`` (:mod:`dist_supernet.plugins`), so
  that the collectives and baselines they register are valid choices;
- :func:`validate_layout` with the world size from torchrun's environment.

``train/preflight.py: check_config`` runs the last two with the data, the model
(on the meta device) and the ``supernet`` group: the one pass every caller uses.

Example::
    >>> from omegaconf import OmegaConf
    >>> cfg = OmegaConf.create({"optim": {"name": "adamw", "lr": -1.0}})
    >>> try:
    ...     validate_group(cfg, "optim", OPTIM_SCHEMAS)
    ... except ConfigError as e:
    ...     print(e)
    optim.lr=-1.0: must be > 0
"""

import dataclasses
import datetime
import math
import os
import types
import typing
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from dist_supernet.errors import ConfigError, format_value  # noqa: F401  (re-exported: the one error format)
from dist_supernet.schema import bounded, range_problem


GROUPS = ("compression", "optim", "model", "data", "trainer")
# Top-level keys a composed config may hold: the groups, the supernet group (read for supernet models),
# the low-frequency synchronisation group (absent: none), the plugin modules, and hydra's own section when
# composed with return_hydra_config (the pre-flight).
TOP_LEVEL_KEYS = (*GROUPS, "supernet", "sync", "plugins", "hydra")
MAX_LR = 10.0  # why: Birder moves every coordinate by lr per step; SGD/AdamW beyond 10 diverge at once
MAX_TIMEOUT_S = 7 * 24 * 3600  # why: a week is longer than any legitimate wait; timedelta overflows near 1e14 s
MAX_SEED = 2**31  # why: fits every generator seeded from it (numpy: < 2**32) with room for + rank
# The collective and baseline choices are the registries' (dist_supernet.comm), read inside validate():
# importing this module stays free of torch (the entry point's first checks run before torch loads).
SCHEDULES = ("constant", "cosine")


# ---------------------------------------------------------------------------------------
# Schemas: one dataclass per group choice; the field defaults are what a yaml may leave out.


@dataclasses.dataclass
class BirderCompression:
    name: str = "birder"
    collective: str = "auto"
    requantize: bool = False
    inter_node: str = "auto"
    bucket_cap_mb: int | None = None
    num_nodes: int | None = bounded(None, min=1)
    timeout_s: float | None = None


@dataclasses.dataclass
class BirderOptim:
    name: str = "birder"
    lr: float = 1e-3
    beta: float = 0.9
    weight_decay: float = 0.0
    amsgrad: bool = False
    schedule: str = "cosine"
    warmup_steps: int = 0
    normalizer: str = "abs"
    beta2: float | None = None
    grad_clip: float | None = None


@dataclasses.dataclass
class AdamWOptim:
    name: str = "adamw"
    lr: float = 1e-3
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = None


@dataclasses.dataclass
class SGDOptim:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = None


@dataclasses.dataclass
class DataConfig:
    name: str = "digits"
    path: str | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_seed: int = 0


@dataclasses.dataclass
class TextDataConfig(DataConfig):
    """``data=text``: the embedded corpus (``path: null``) or a UTF-8 text file; see dist_supernet/data/text.py."""

    name: str = "text"
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    eval_windows: int = bounded(128, min=1)
    cache_dir: str | None = None


def data_schemas() -> dict[str, type]:
    """``data.name`` -> its schema (every dataset of ``dist_supernet.data.DATASETS``)."""
    from dist_supernet.data import DATASETS

    return {name: TextDataConfig if name == "text" else DataConfig for name in DATASETS}


@dataclasses.dataclass
class TrainerConfig:
    max_steps: int = 300
    batch_size: int = 32
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 100
    seed: int = 0
    checkpoint_every: int = 100
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 3
    resume: str = "auto"
    resume_weights_only: bool = False
    async_checkpoint: bool = False
    device: str = "auto"
    crash_at_step: int | None = None
    max_consecutive_skips: int = 5
    timeout_s: float = 600.0
    sync_check_every: int = 50
    inject_nan_at_steps: list[int] = dataclasses.field(default_factory=list)
    parallelism: str = "ddp"
    inject_divergence_at_step: int | None = None
    tensorboard: str | bool = "auto"


def compression_schemas() -> dict[str, type]:
    """``compression.name`` -> its schema: ``birder``, then every registered baseline's own (comm.BASELINES)."""
    from dist_supernet.comm.baselines import BASELINES

    return {"birder": BirderCompression, **{name: baseline.config for name, baseline in BASELINES.items()}}


OPTIM_SCHEMAS = {"birder": BirderOptim, "adamw": AdamWOptim, "sgd": SGDOptim}


@dataclasses.dataclass
class NoSync:
    name: str = "none"


def sync_schemas() -> dict[str, type]:
    """``sync.name`` -> its schema: ``none`` or ``diloco`` (dist_supernet.sync.DiLoCoConfig)."""
    from dist_supernet.sync.config import DiLoCoConfig

    return {"none": NoSync, "diloco": DiLoCoConfig}


@dataclasses.dataclass
class TrainConfig:
    """The validated config: plain dataclasses, plus the model's own mapping."""

    compression: object  # BirderCompression, or the registered baseline's config (comm.BaselineConfig)
    optim: BirderOptim | AdamWOptim | SGDOptim
    model: dict
    data: DataConfig  # or TextDataConfig
    trainer: TrainerConfig
    sync: object = dataclasses.field(default_factory=NoSync)  # NoSync or dist_supernet.sync.DiLoCoConfig


# ---------------------------------------------------------------------------------------
# Checks


def _check(ok: bool, key: str, value, reason: str) -> None:
    if not ok:
        raise ConfigError(key, value, reason)


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if annotation is float:  # an int is a fine float (lr=1)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    name = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    return name or str(annotation).replace("typing.", "").replace("NoneType", "null").replace("None", "null")


def to_schema(node, prefix: str, schema: type):
    """Fill ``schema`` from a config node: unknown keys and wrong types are ConfigErrors."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else dict(node)
    hints = typing.get_type_hints(schema)
    for key, value in values.items():
        missing = isinstance(node, DictConfig) and OmegaConf.is_missing(node, key)
        _check(not missing, f"{prefix}.{key}", value, "required (no default), set it on the command line")
        _check(key in hints, f"{prefix}.{key}", value, f"unknown key (expected one of {', '.join(hints)})")
        _check(_type_ok(value, hints[key]), f"{prefix}.{key}", value, f"expected {_type_name(hints[key])}")
        _check(_finite(value), f"{prefix}.{key}", value, "must be a finite number")
    return schema(**values)


def _finite(value) -> bool:
    """No NaN or +-inf anywhere in a value (``optim.lr=inf`` would pass ``> 0``)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def validate_group(cfg: DictConfig, group: str, schemas: dict[str, type]):
    """Validate ``cfg[group]`` against the schema its ``name`` picks; returns the dataclass."""
    node = cfg[group]
    name = node.get("name")
    _check(name in schemas, f"{group}.name", name, f"expected one of {', '.join(schemas)}")
    obj = to_schema(node, group, schemas[name])
    _check_ranges(group, obj)
    return obj


def _check_ranges(group: str, obj) -> None:
    k = lambda field: f"{group}.{field}"  # noqa: E731
    problem = range_problem(obj) if dataclasses.is_dataclass(obj) else None  # ranges the schema declares
    if problem is not None:
        raise ConfigError(k(problem[0]), problem[1], problem[2])
    if group == "compression":
        from dist_supernet.comm.collectives import INTER_NODE_FORMS, collective_choices

        collectives = collective_choices()
        if obj.name == "birder":
            _check(obj.collective in collectives, k("collective"), obj.collective,
                   f"expected one of {', '.join(collectives)}")
            _check(obj.inter_node in INTER_NODE_FORMS, k("inter_node"), obj.inter_node,
                   f"expected one of {', '.join(INTER_NODE_FORMS)}")
            _check(obj.bucket_cap_mb is None or 1 <= obj.bucket_cap_mb <= 4096, k("bucket_cap_mb"),
                   obj.bucket_cap_mb, "must be in [1, 4096] MB or null")
        else:
            _check(obj.collective == "allreduce", k("collective"), obj.collective,
                   f"compression={obj.name} uses DDP's allreduce; the 1-bit collectives "
                   f"({', '.join(collectives)}) need compression=birder")
        if obj.name == "birder":
            _check(obj.timeout_s is None or obj.timeout_s > 0, k("timeout_s"), obj.timeout_s, "must be > 0 or null")
            _check(obj.timeout_s is None or obj.timeout_s <= MAX_TIMEOUT_S, k("timeout_s"), obj.timeout_s,
                   f"must be <= {MAX_TIMEOUT_S} (7 days)")
    elif group == "optim":
        _check(obj.lr > 0, k("lr"), obj.lr, "must be > 0")
        _check(obj.lr <= MAX_LR, k("lr"), obj.lr, f"must be <= {MAX_LR} (a larger step diverges at once)")
        _check(obj.weight_decay >= 0, k("weight_decay"), obj.weight_decay, "must be >= 0")
        _check(obj.schedule in SCHEDULES, k("schedule"), obj.schedule, f"expected one of {', '.join(SCHEDULES)}")
        _check(obj.warmup_steps >= 0, k("warmup_steps"), obj.warmup_steps, "must be >= 0")
        clip = getattr(obj, "grad_clip", None)
        _check(clip is None or clip > 0, k("grad_clip"), clip, "must be > 0 (the largest gradient norm), or null")
        if obj.name == "birder":
            _check(0 <= obj.beta < 1, k("beta"), obj.beta, "must be in [0, 1)")
            _check(obj.normalizer in ("abs", "rms"), k("normalizer"), obj.normalizer, "expected one of abs, rms")
            _check(obj.beta2 is None or 0 <= obj.beta2 < 1, k("beta2"), obj.beta2, "must be in [0, 1), or null")
        elif obj.name == "adamw":
            _check(len(obj.betas) == 2 and all(0 <= b < 1 for b in obj.betas), k("betas"), obj.betas,
                   "must be two numbers in [0, 1)")
            _check(obj.eps > 0, k("eps"), obj.eps, "must be > 0")
        elif obj.name == "sgd":
            _check(0 <= obj.momentum < 1, k("momentum"), obj.momentum, "must be in [0, 1)")
    elif group == "sync" and obj.name != "none":
        from dist_supernet.sync.config import check

        try:
            check(obj)
        except ConfigError as error:
            raise error.under("sync") from None
        if obj.backup_device == "cuda":
            check_device("cuda", key="sync.backup_device")
    elif group == "data":
        _check(0 < obj.val_fraction < 1, k("val_fraction"), obj.val_fraction, "must be in (0, 1)")
        _check(0 <= obj.split_seed < MAX_SEED, k("split_seed"), obj.split_seed, f"must be in [0, {MAX_SEED})")
        _check(0 <= obj.test_fraction < 1 - obj.val_fraction, k("test_fraction"), obj.test_fraction,
               f"must be in [0, 1 - data.val_fraction={obj.val_fraction}) (0 = no test split)")
        if obj.name == "npz" or obj.path is not None:
            _check(obj.path is not None, k("path"), obj.path, "data=npz needs data.path=/path/to/file.npz")
            _check(os.path.exists(obj.path), k("path"), obj.path, "file not found")
            _check(os.path.isfile(obj.path), k("path"), obj.path, "is not a regular file")
    elif group == "trainer":
        for field in ("max_steps", "batch_size", "grad_accum"):
            _check(getattr(obj, field) >= 1, k(field), getattr(obj, field), "must be >= 1")
        _check(obj.keep_checkpoints >= 2, k("keep_checkpoints"), obj.keep_checkpoints,
               "must be >= 2 (a damaged newest checkpoint must leave one to resume from)")
        for field in ("log_every", "eval_every", "checkpoint_every"):
            _check(getattr(obj, field) >= 0, k(field), getattr(obj, field), "must be >= 0 (0 = off)")
        _check(obj.sync_check_every >= 0, k("sync_check_every"), obj.sync_check_every,
               "must be >= 0 (0 = only before each checkpoint and at the end)")
        _check(obj.device in ("auto", "cpu", "cuda"), k("device"), obj.device, "expected one of auto, cpu, cuda")
        _check(obj.parallelism in ("ddp", "hsdp"), k("parallelism"), obj.parallelism, "expected one of ddp, hsdp")
        # A checkpoint is a step_N directory (torch.distributed.checkpoint); a file is the older
        # single-file format, refused with one line when the trainer opens it.
        problem = resume_path_problem(obj.resume)
        _check(problem is None, k("resume"), obj.resume, problem or "")
        is_checkpoint = os.path.isfile(obj.resume) or any(
            os.path.isfile(os.path.join(obj.resume, name)) for name in ("manifest.json", ".metadata"))
        _check(obj.resume in ("auto", "never") or is_checkpoint, k("resume"), obj.resume,
               "expected auto, never, or the path of a checkpoint file or step_N directory")
        _check(obj.max_consecutive_skips >= 1, k("max_consecutive_skips"), obj.max_consecutive_skips, "must be >= 1")
        _check(obj.timeout_s > 0, k("timeout_s"), obj.timeout_s, "must be > 0 (seconds)")
        _check(obj.timeout_s <= MAX_TIMEOUT_S, k("timeout_s"), obj.timeout_s,
               f"must be <= {MAX_TIMEOUT_S} (7 days; torch's timeouts overflow far above)")
        _check(0 <= obj.seed < MAX_SEED, k("seed"), obj.seed, f"must be in [0, {MAX_SEED})")
        check_device(obj.device)
        _check(all(s >= 1 for s in obj.inject_nan_at_steps), k("inject_nan_at_steps"), obj.inject_nan_at_steps,
               "steps are 1-based, each must be >= 1")
        _check(obj.inject_divergence_at_step is None or obj.inject_divergence_at_step >= 1,
               k("inject_divergence_at_step"), obj.inject_divergence_at_step, "steps are 1-based, must be >= 1")
        _check(isinstance(obj.tensorboard, bool) or obj.tensorboard == "auto", k("tensorboard"), obj.tensorboard,
               "expected auto, true or false")
        if obj.tensorboard is True:
            from dist_supernet.train.metrics import tensorboard_import_error

            error = tensorboard_import_error()
            _check(error is None, k("tensorboard"), obj.tensorboard,
                   f"needs the tensorboard package (pip install tensorboard; or trainer.tensorboard=auto to write "
                   f"event files only when it is installed): {error}")
        if obj.checkpoint_dir is not None:
            from dist_supernet.train.untrusted import check_directory

            check_directory(k("checkpoint_dir"), obj.checkpoint_dir)


# What DCP writes into a checkpoint directory besides the manifest: a path to one of them names the
# checkpoint's inside, not a checkpoint.
_CHECKPOINT_FILES = ("manifest.json", ".metadata")


def resume_path_problem(path: str) -> str | None:
    """Why ``trainer.resume=<path>`` names a file inside a checkpoint directory (None otherwise).

    ``step_N/manifest.json`` or ``step_N/__0_0.distcp`` is not an older single-file checkpoint
    but a part of a ``step_N`` directory; the fix is to name the directory.

    >>> resume_path_problem("auto") is None
    True
    """
    if path in ("auto", "never") or not os.path.isfile(path):
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if any(os.path.isfile(os.path.join(parent, name)) for name in _CHECKPOINT_FILES):
        return (f"names {os.path.basename(path)}, a file inside the checkpoint directory {os.path.basename(parent)}; "
                f"name the directory itself: trainer.resume={os.path.dirname(path) or '.'}")
    return None


def validate(cfg: DictConfig) -> TrainConfig:
    """Check the composed config; returns typed dataclasses or raises ConfigError."""
    for key in cfg:
        _check(key in TOP_LEVEL_KEYS, str(key), cfg.get(key),
               f"unknown top-level key (expected one of {', '.join(TOP_LEVEL_KEYS[:-1])})")
    load_config_plugins(cfg)
    for group in GROUPS:
        _check(group in cfg and isinstance(cfg[group], DictConfig), group, cfg.get(group), "missing config group")
    from dist_supernet.models import available_models

    compression = validate_group(cfg, "compression", compression_schemas())
    optim = validate_group(cfg, "optim", OPTIM_SCHEMAS)
    _check(compression.name != "birder" or optim.name == "birder", "optim.name", optim.name,
           "compression=birder sends 1-bit Birder updates and needs optim=birder")
    sync = validate_group(cfg, "sync", sync_schemas()) if "sync" in cfg else NoSync()
    _check(sync.name == "none" or compression.name != "birder", "compression.name", compression.name,
           "sync=diloco runs DDP inside each node and exchanges between nodes every sync.every steps: use "
           "compression=none (or another baseline) inside the node, and sync.quantizer=birder for 1 bit between nodes")
    data = validate_group(cfg, "data", data_schemas())
    trainer = to_schema(cfg.trainer, "trainer", TrainerConfig)
    _check_ranges("trainer", trainer)
    # FSDP2 has no DDP comm hook: its gradient exchange is Birder's 1-bit hook, or FSDP's own fp32 all-reduce.
    _check(trainer.parallelism != "hsdp" or compression.name in ("birder", "none"), "compression.name",
           compression.name, "trainer.parallelism=hsdp takes compression=birder (1 bit across nodes) or "
           "compression=none (FSDP's native fp32 HSDP); the other compressions are DDP comm hooks")
    # Birder clips each rank's own gradient: under HSDP a rank holds a shard of its node's gradient.
    optim_clip = cfg.optim.get("grad_clip") if cfg.optim.get("name") == "birder" else None
    _check(trainer.parallelism != "hsdp" or optim_clip is None, "optim.grad_clip", optim_clip,
           "Birder's per-rank clipping runs under trainer.parallelism=ddp only (HSDP: not supported yet)")
    # DiLoCo reads and writes each rank's whole replica through flat views: a DDP replica, not FSDP shards.
    _check(sync.name == "none" or trainer.parallelism == "ddp", "trainer.parallelism", trainer.parallelism,
           "sync=diloco keeps a whole replica on each rank (DDP inside the node); use trainer.parallelism=ddp")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    _check(model.get("name") in available_models(), "model.name", model.get("name"),
           f"expected one of {', '.join(available_models())}")
    if isinstance(cfg.get("supernet"), DictConfig):  # a supernet model checks all of it; any model its keys
        from dist_supernet.supernet.config import SUPERNET_KEYS

        for key in cfg.supernet:
            _check(key in SUPERNET_KEYS, f"supernet.{key}", cfg.supernet.get(key),
                   f"unknown key (expected one of {', '.join(SUPERNET_KEYS)})")
    return TrainConfig(compression=compression, optim=optim, model=model, data=data, trainer=trainer, sync=sync)


def load_config_plugins(cfg: DictConfig) -> list[str]:
    """Import the modules the top-level ``plugins`` key lists (see :mod:`dist_supernet.plugins`); ConfigError if not."""
    from dist_supernet.plugins import load_plugins

    modules = cfg.get("plugins")
    if modules is None:
        return []
    modules = OmegaConf.to_container(modules, resolve=True) if isinstance(modules, ListConfig) else modules
    _check(isinstance(modules, list), "plugins", modules,
           "expected a list of module names, e.g. plugins=[my_package.my_collective]")
    return load_plugins(modules)


def check_device(device: str, key: str = "trainer.device") -> None:
    """``trainer.device`` (or ``key``) names a device this process has (under torchrun: one GPU per local rank)."""
    if device == "cpu":
        return
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, device, "no CUDA device is visible to this process "
                                                  "(torch.cuda.is_available() is False); use cpu or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():
        raise ConfigError(key, device, f"LOCAL_RANK={local_rank} needs GPU {local_rank} but only "
                                                    f"{torch.cuda.device_count()} are visible; start at most "
                                                    f"{torch.cuda.device_count()} processes per node")


def validate_layout(compression, world_size: int) -> None:
    """Checks that need the world size (known from torchrun's environment before any process group)."""
    n = compression.num_nodes
    _check(n is None or world_size % n == 0, "compression.num_nodes", n,
           f"must divide the world size {world_size}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    _check(n is not None or world_size % local == 0, "compression.num_nodes", n,
           f"torchrun's LOCAL_WORLD_SIZE={local} does not divide the world size {world_size}; set num_nodes")


def check_group_choices(args: list[str], conf_dir: Path) -> None:
    """Fail with one line on ``group=choice`` overrides naming no file in ``conf/<group>/``.

    Hydra would report the same mistake with a listing of the search path; this
    runs first so the user sees ``compression=typo: expected one of ...``.
    Skipped when the search path is extended (the choice may live elsewhere).
    """
    if any(a.startswith("hydra.searchpath") for a in args):
        return
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if group not in (*GROUPS, "supernet", "sync") or "," in value or value in ("", "null"):
            continue
        choices = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        _check(value in choices, group, value, f"expected one of {', '.join(choices)}")


# ---------------------------------------------------------------------------------------
# Resolvers used by conf/train.yaml's hydra section.

def run_stamp(fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """A timestamp every rank of one torchrun job agrees on, stable across its restarts.

    ``${now:}`` is evaluated in each process, so ranks straddling a second
    would pick different directories, and a ``--max-restarts`` restart would
    pick a new one and not find its checkpoints. Under torchrun this is the
    start time of the torchrun agent (the workers' parent process), which is
    the same for all ranks of a node and does not change when the agent
    restarts them. With several nodes the trainer still uses rank 0's
    directory for everything it writes (see ``agree_on_output_dir``).
    ``DIST_SUPERNET_RUN_STAMP`` overrides; outside torchrun it is the local time.
    """
    stamp = os.environ.get("DIST_SUPERNET_RUN_STAMP")
    if stamp:
        return stamp
    started = _agent_start_time() if "TORCHELASTIC_RUN_ID" in os.environ else None
    when = datetime.datetime.fromtimestamp(started) if started else _process_start
    return when.strftime(fmt)


_process_start = datetime.datetime.now()


def _agent_start_time() -> float | None:
    """Unix time the parent process started (Linux /proc), or None."""
    try:
        with open(f"/proc/{os.getppid()}/stat") as f:
            # Field 22, after the parenthesised command name (which may hold spaces).
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot_time = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot_time + start_ticks / os.sysconf("SC_CLK_TCK")


def rank0_only(value):
    """``value`` on rank 0 (or outside torchrun), null elsewhere."""
    return value if os.environ.get("RANK", "0") == "0" else None


def register_resolvers() -> None:
    """Register ``${run_stamp:fmt}`` and ``${rank0_only:value}`` (idempotent)."""
    for name, fn in (("run_stamp", run_stamp), ("rank0_only", rank0_only)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
