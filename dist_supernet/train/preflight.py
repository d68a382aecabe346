"""Checks that run before any process group: the pre-flight of ``launch/*.sh`` and the trainer's own.

``python -m dist_supernet.train --check <overrides>`` composes the config
the way the job will, then runs every check the trainer runs before its
process group (config values, data files, the model, devices, paths), the
checks of an explicit ``trainer.resume=<path>`` (which the trainer makes once
its process group exists), and that the run directory is not held by another job.
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

import os
import socket
from pathlib import Path

from dist_supernet.train.config import ConfigError


def explicit_run_dir(overrides: list[str]) -> str | None:
    """The ``hydra.run.dir=...`` the command line sets (None when absent or an interpolation)."""
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hydra.run.dir" and value and "${" not in value:
            return value.strip("'\"")
    return None


def check_can_hold_file(key: str, path: str | Path) -> None:
    """``path`` (or, while it does not exist, its nearest existing ancestor) takes a small fsynced file.

    Permission bits say little (root passes ``os.access`` on ``/proc``, a full or
    read-only filesystem passes it too), so this writes, fsyncs and removes a file.
    Creates nothing that stays.
    """
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


def preflight(overrides: list[str], conf_dir: Path) -> None:
    """Every pre-process-group check of the job these overrides start; raises ConfigError (or ValueError).

    The world size comes from ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE`` (the launchers set
    them from their process counts). Multirun and other Hydra flags are not checked here.
    """
    if any(arg.startswith("-") for arg in overrides):
        return
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from dist_supernet.models import is_supernet
    from dist_supernet.train.supernet_trainer import SupernetTrainer
    from dist_supernet.train.trainer import Trainer

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name="train"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    run_dir = Path(str(cfg.hydra.run.dir))
    with open_dict(cfg):
        del cfg["hydra"]
    trainer_cls = SupernetTrainer if is_supernet(cfg.model.get("name")) else Trainer
    check_resume(trainer_cls(cfg, output_dir=run_dir, check_only=True))


def check_resume(trainer) -> None:
    """An explicit ``trainer.resume=<path>``: the checks ``Trainer._resume`` makes, here before any process.

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
    from dist_supernet.train.untrusted import check_fits_model, check_recipe

    key, path = "trainer.resume", Path(tcfg.resume)
    found = CheckpointManager(path.parent).open(path, key, tcfg.resume)
    check_fits_model(key, tcfg.resume, found.path, {"model": found.shapes("model"), "config": found.config},
                     trainer.model, trainer.cfg.model)
    if not tcfg.resume_weights_only:
        check_recipe(key, tcfg.resume, found.path.name, found.config, trainer.config_dict)
