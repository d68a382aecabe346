"""The one validation pass before any process starts, and the launchers' pre-flight around it.

:func:`check_config` is THE pass, over every config group: the schemas of
``train/config.py`` (``validate``, ``validate_layout``), the data (loaded once,
so a bad file or a batch larger than a rank's shard is refused), the model
(built on the meta device: every ``model.*`` value reaches its builder, and
no memory is spent), the ``supernet.*`` group of a supernet family
(``supernet/config.py``'s checks against that model) and the paths the run
writes. Every mistake is one ``ConfigError``: ``key=value: reason``. Three
callers, no second copy: ``Trainer.__init__`` (every rank, before its process
group), the sweep launcher (``hydra_plugins/dist_supernet_torchrun``: a
rejected job is ``invalid`` and never launched), and the pre-flight below.

``python -m dist_supernet.train --check <overrides>`` composes the config
the way the job will, runs :func:`check_config`, then the checks of an
explicit ``trainer.resume=<path>`` (which the trainer makes once its process
group exists), and that the run directory is not held by another job.
It prints nothing and exits 0 when all pass, else one line
(``error: key=value: reason``) and exits 2. The launchers run it before
torchrun, so a config error is one line and status 2 instead of torchrun's
traceback, status 1 and ``--max-restarts`` retries of a job that cannot start.

Example::
    $ WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 python -m dist_supernet.train --check optim.lr=inf
    error: optim.lr=inf: must be a finite number
    $ echo $?
    2
"""

import dataclasses
import errno
import os
import socket
from pathlib import Path

from dist_supernet.train.config import ConfigError, TrainConfig


def explicit_run_dir(overrides: list[str]) -> str | None:
    """The ``hydra.run.dir=...`` the command line sets (None when absent or an interpolation)."""
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hydra.run.dir" and value and "${" not in value:
            return value.strip("'\"")
    return None


def path_name_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot name a file here at all (a component longer than the filesystem allows), or None.

    ``os.stat`` of such a path raises ENAMETOOLONG, which ``Path.exists`` does not swallow: a
    check that stats it first fails with a traceback instead of naming the problem.

    >>> path_name_problem("/tmp/" + "a" * 300)
    'its component aaaaaaaaaaaaaaaaaaaa... is 300 bytes, more than the 255 a file name may have here'
    """
    parts = Path(os.path.abspath(path)).parts
    for i, part in enumerate(parts[1:], start=1):
        parent = os.path.join(*parts[:i])
        try:
            limit = os.pathconf(parent, "PC_NAME_MAX") if os.path.isdir(parent) else 255
        except (OSError, ValueError):
            limit = 255  # the usual NAME_MAX (ext4, xfs, tmpfs, NFS)
        if len(part.encode()) > limit:
            return f"its component {part[:20]}... is {len(part.encode())} bytes, more than the {limit} a file name " \
                   "may have here"
    return None


def os_error_problem(error: OSError) -> str:
    """One line for an OSError met while checking a path: its errno name and text, e.g. ``ENAMETOOLONG (...)``."""
    name = errno.errorcode.get(error.errno or 0, "")
    return f"{name} ({error.strerror or error})" if name else str(error)


def check_can_hold_file(key: str, path: str | Path) -> None:
    """``path`` (or, while it does not exist, its nearest existing ancestor) takes a small fsynced file.

    Permission bits say little (root passes ``os.access`` on ``/proc``, a full or
    read-only filesystem passes it too), so this writes, fsyncs and removes a file.
    Creates nothing that stays. A path that cannot even be looked at (a component over
    the filesystem's 255 bytes, a loop of links) is refused the same way, in one line.
    """
    problem = path_name_problem(path)
    if problem:
        raise ConfigError(key, str(path), problem)
    try:
        _check_can_hold_file(key, path)
    except OSError as e:
        raise ConfigError(key, str(path), f"cannot be used: {os_error_problem(e)}") from None


def _check_can_hold_file(key: str, path: str | Path) -> None:
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(key, str(path), "is a file, not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, str(path), f"cannot be created: {existing} is a file")
    probe = existing / f".dist_supernet_probe.{socket.gethostname()}.{os.getpid()}"
    what = "cannot hold a file" if existing == target else f"cannot be created: a file written to {existing} fails"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"dist_supernet write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise ConfigError(key, str(path), f"{what} ({e.strerror or e})") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


@dataclasses.dataclass
class CheckedConfig:
    """What :func:`check_config` found valid, for the trainer to build on."""

    cfg: TrainConfig  # the typed groups
    config_dict: dict  # the whole composed config, resolved (recorded in every checkpoint's manifest)
    data: "Dataset | TextDataset"  # loaded and split
    model: "torch.nn.Module"  # built on the meta device: parameter shapes, no storage
    supernet: dict | None  # a supernet family's checked supernet group (phases resolved), else None


def check_config(cfg, output_dir: str | Path, *, world_size: int | None = None) -> CheckedConfig:
    """The one validation pass over every config group; ``ConfigError`` (``key=value: reason``) on the first mistake.

    ``cfg`` is the composed config (a ``hydra`` section is ignored); ``world_size``
    defaults to ``WORLD_SIZE`` (torchrun sets it; 1 without torchrun).

    Example::
        cfg = compose("train", overrides=["supernet.distillation.weight=2"])
        check_config(cfg, "outputs/run", world_size=2)
        # ConfigError: supernet.distillation.weight=2: expected a number in [0, 1]
    """
    import torch
    from omegaconf import DictConfig, OmegaConf

    from dist_supernet.data import load_data
    from dist_supernet.models import build_model, is_supernet, model_data_kind
    from dist_supernet.train.config import validate, validate_layout

    run = validate(cfg)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    validate_layout(run.compression, world_size)
    data = load_data(run.data)
    wants = model_data_kind(run.model["name"], run.model)
    if wants != data.kind:
        hint = "data=text" if wants == "text" else "data=digits, mnist5k or npz"
        raise ConfigError("model.name", run.model["name"], f"trains on {wants} data; data={run.data.name} is "
                                                           f"{data.kind} data ({hint})")
    with torch.device("meta"):  # every model.* value reaches the builder; no weights are allocated
        model = build_model(run.model, **data.model_inputs())
    # A batch larger than a rank's shard, or a split shorter than one of the model's windows: refused now.
    data.train_batches(rank=0, world_size=world_size, batch_size=run.trainer.batch_size, seed=0, model=model)
    data.check_eval(model)
    supernet = None
    if is_supernet(run.model["name"]):
        from dist_supernet.supernet import check_supernet_config

        supernet_cfg = cfg.get("supernet")
        if not isinstance(supernet_cfg, DictConfig):
            raise ConfigError("supernet", supernet_cfg, f"model={run.model['name']} is a supernet and needs the "
                                                        "supernet config group (e.g. supernet=sandwich)")
        supernet = check_supernet_config(OmegaConf.to_container(supernet_cfg, resolve=True), model)
    # Every rank writes its own checkpoint shard: a path that cannot hold a file fails now, not at the end.
    if run.trainer.checkpoint_dir is not None:
        check_can_hold_file("trainer.checkpoint_dir", run.trainer.checkpoint_dir)
    check_can_hold_file("hydra.run.dir", output_dir)
    config_dict = {str(key): OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key])
                   else cfg[key] for key in cfg if key != "hydra"}  # hydra's own section: the sweep's, not the run's
    return CheckedConfig(cfg=run, config_dict=config_dict, data=data, model=model, supernet=supernet)


def preflight(overrides: list[str], conf_dir: Path) -> None:
    """Every pre-process-group check of the job these overrides start; raises ConfigError (or ValueError).

    The world size comes from ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE`` (the launchers set
    them from their process counts). Multirun and other Hydra flags are not checked here.
    """
    if any(arg.startswith("-") for arg in overrides):
        return
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name="train"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    run_dir = Path(str(cfg.hydra.run.dir))
    with open_dict(cfg):
        del cfg["hydra"]
    checked = check_config(cfg, run_dir)
    check_resume(checked)
    check_other_runs(checked.cfg.trainer, run_dir)


def check_other_runs(tcfg, run_dir: Path) -> None:
    """A job that will not resume from its checkpoint directory, while another run's checkpoints are in it:
    the refusal ``Trainer._resume`` makes (``CheckpointManager.claim``), here before any process starts.

    ``trainer.resume=auto`` is left to the trainer (which checkpoint it finds is decided at start).
    """
    if tcfg.resume == "auto":
        return
    from dist_supernet.train.checkpoint import CheckpointManager

    ckpts = CheckpointManager(Path(tcfg.checkpoint_dir) if tcfg.checkpoint_dir else Path(run_dir) / "checkpoints")
    inside = tcfg.resume != "never" and not tcfg.resume_weights_only and \
        Path(tcfg.resume).resolve().parent == ckpts.directory.resolve()
    if not inside:  # resuming a checkpoint of this directory continues its run: the trainer adopts it
        ckpts.claim(None, "trainer.resume", tcfg.resume)


def check_resume(trainer) -> None:
    """An explicit ``trainer.resume=<path>``: the checks ``Trainer._resume`` makes, here before any process.

    ``trainer``: a :class:`CheckedConfig` or a ``Trainer`` (both have ``cfg``, ``model``, ``config_dict``).

    The trainer makes them after its process group exists (every rank hashes a share
    of the files); here, without one, this process reads all of it: the checkpoint is
    complete and unaltered, fits the model, and (unless ``trainer.resume_weights_only``)
    was written with the same recipe. ``auto`` is not checked here: which checkpoint
    it finds is decided at start.
    """
    tcfg = trainer.cfg.trainer
    if tcfg.resume in ("auto", "never"):
        return
    from dist_supernet.train.checkpoint import CheckpointManager
    from dist_supernet.train.untrusted import check_fits_model, check_optimizer_state, check_recipe, check_steps_left

    key, path = "trainer.resume", Path(tcfg.resume)
    found = CheckpointManager(path.parent).open(path, key, tcfg.resume)
    check_fits_model(key, tcfg.resume, found.path, {"model": found.shapes(*found.model_path()), "config": found.config},
                     trainer.model, trainer.cfg.model)
    if not tcfg.resume_weights_only:
        check_recipe(key, tcfg.resume, found.path.name, found.config, trainer.config_dict)
        check_optimizer_state(key, tcfg.resume, found.path.name, found.optimizer_kind, trainer.cfg.optim.name)
        check_steps_left(found.path.name, found.step, tcfg.max_steps)
