"""`torchrun --standalone --nproc_per_node=2 -m dist_supernet.train [hydra overrides]`.

A mistake in the config prints one line, ``error: optim.lr=-1.0: must be > 0``,
on every rank and exits with status 2 (``HYDRA_FULL_ERROR=1`` shows the traceback).
``--check`` runs only those checks, before any process exists (the launchers'
pre-flight: dist_supernet/train/preflight.py).

Exit status: 0 done; 1 a fault while training (a dead or stopped peer, a diverged
run, replicas that differ, a checkpoint that could not be written); 2 a mistake in
the config or the inputs, a path that cannot be used, or a run directory another
job holds; 143 (SIGTERM) or 130 (SIGINT, Ctrl-C) stopped after writing a checkpoint
(rerun the same command to resume from it).
"""

import logging
import os
import sys
import threading
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# Light imports only up here: a typo in a group choice or a busy run directory is refused in about a
# second, before torch and the trainer are imported (inside run() and preflight()).
from dist_supernet.train.config import check_group_choices, register_resolvers
from dist_supernet.train.preflight import check_can_hold_file, explicit_run_dir, preflight
from dist_supernet.train.runlock import check_free

# A checkout (or editable install) reads conf/ at the repository root; a regular
# install ships the same files as dist_supernet/conf (see setup.py).
_REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
CONF_DIR = _REPO_CONF if (_REPO_CONF / "train.yaml").is_file() else Path(__file__).resolve().parents[1] / "conf"
register_resolvers()


def fail(error: Exception, message: str | None = None, status: int = 2) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    # One write, newline included: print() writes the text and the newline separately, and two ranks'
    # lines on torchrun's shared stderr then interleave ("...stoppingerror: ...").
    sys.stderr.write(f"error: {message or error}\n")
    sys.stderr.flush()
    sys.exit(status)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def run(cfg: DictConfig) -> None:
    from dist_supernet.models import is_supernet
    from dist_supernet.train.distributed import Preempted
    from dist_supernet.train.faults import runtime_fault_message
    from dist_supernet.train.supernet_trainer import SupernetTrainer
    from dist_supernet.train.trainer import Trainer, setup_logging

    setup_logging()
    try:  # ValueErrors before the first step are the user's: bad values, missing files
        # A family registered with supernet=True trains sampled subnets and ends with search and export.
        trainer_cls = SupernetTrainer if is_supernet(cfg.model.get("name")) else Trainer
        trainer = trainer_cls(cfg, output_dir=Path(HydraConfig.get().runtime.output_dir))
    except ValueError as e:
        fail(e)
    except OSError as e:  # a path or disk problem met while setting up (Hydra's files, the output dir)
        fail(e, f"cannot start: {e}")
    try:
        trainer.fit()
    except Preempted as e:  # every rank, after the same step's checkpoint
        line = (f"stopped: {e}; exit status {e.exit_status}: rerun the same command "
                f"(hydra.run.dir={trainer.output_dir}) to resume")
        # Rank 0 on the console; every rank in its own log file (the others' consoles show warnings only).
        logging.getLogger(__name__).log(logging.WARNING if trainer.is_rank0 else logging.INFO, line)
        sys.exit(e.exit_status)
    except Exception as e:  # a hung peer or a diverged run: one line, status 1 (torchrun may restart)
        message = runtime_fault_message(e)
        if message is None:
            raise
        fail(e, message, status=1)
    finally:
        _close_within(trainer, CLOSE_TIMEOUT_S)


# Shutting down the process groups hung on rank 1 in two test runs on this project's 2-core machine
# (2026-12-01), after the run was complete and written: a deadlock in gloo's teardown (its stack dump);
# torch reports similar ones (pytorch/pytorch#75097). A hung teardown must not keep a finished job alive.
CLOSE_TIMEOUT_S = 120.0


def _close_within(trainer, timeout_s: float) -> None:
    """``trainer.close()``; if it has not returned after ``timeout_s`` (a hung teardown of the process
    groups: everything the run writes is written by then), say so and end the process with its status."""
    error = sys.exc_info()[1]
    status = 0 if error is None else (error.code if isinstance(error, SystemExit) else 1)
    timer = threading.Timer(timeout_s, _exit_now, args=(status, f"warning: shutting down the process groups "
                                                                  f"took over {timeout_s:.0f} s; exiting"))
    timer.daemon = True
    timer.start()
    try:
        trainer.close()
    finally:
        timer.cancel()


def _exit_now(status, message: str | None = None) -> None:
    """Flush every log and stream, then end the process without interpreter finalization.

    The run is over and its files are closed; what finalization would still do is destroy torch's
    gloo groups and threads, which can deadlock or abort there (see CLOSE_TIMEOUT_S and Trainer.close).
    """
    if isinstance(status, str):  # sys.exit("text"): Python prints the text and exits with 1
        message, status = status, 1
    if message:
        sys.stderr.write(message + "\n")
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0 if status is None else int(status))


def main() -> None:
    check_only = "--check" in sys.argv[1:]
    if check_only:
        sys.argv.remove("--check")
    args = sys.argv[1:]
    try:
        check_group_choices(args, CONF_DIR)
        # Before Hydra writes .hydra/ and the log files into a directory another job holds.
        run_dir = explicit_run_dir(args)
        if run_dir is not None:
            check_can_hold_file("hydra.run.dir", run_dir)  # before Hydra stats or creates it
            check_free(run_dir)
        if check_only:
            preflight(args, CONF_DIR)
    except ValueError as e:
        fail(e)
    except Exception as e:  # Hydra's and OmegaConf's errors (an override of a key that does not exist, ...)
        if not check_only or type(e).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        fail(e, " ".join(str(e).split()))
    if check_only:
        return
    try:
        run()
    except SystemExit as done:  # fail(), SIGTERM's 143, Hydra's own exits
        _exit_now(done.code)
    except KeyboardInterrupt:  # Ctrl-C before the trainer handles it, or a second Ctrl-C: no traceback
        _exit_now(130, "stopped: SIGINT; stopped at once, without a checkpoint of this moment (the last one "
                       "written, if any, is where a rerun resumes)")
    from dist_supernet.sweep.jobs import sweep_exit_status

    _exit_now(sweep_exit_status())  # a multirun with failed or invalid jobs exits 1, after its table


if __name__ == "__main__":
    main()
