"""``hydra/launcher=torchrun``: each job of a Hydra multirun is one torchrun job, one after the other.

    python -m dist_supernet.train --multirun model=mlp compression=none,birder optim.lr=1e-3,3e-3

For each job of the sweep: compose its config here (cheap), check it with the
training app's one validation pass (``dist_supernet.train.preflight.check_config``:
every group, the data, the model built on the meta device, the supernet group;
a rejected job becomes an ``invalid`` row, not a launch), then ``torchrun --standalone -m dist_supernet.train <job overrides>
hydra.run.dir=<job dir>`` (:func:`dist_supernet.sweep.jobs.run_job`), wait,
record the exit status. A failed job never stops the sweep. The sweep's
``hydra.searchpath`` is passed on to every job (a plugin's config dir, say);
its other ``hydra.*`` overrides configure the sweep only. At the end
:func:`dist_supernet.sweep.report.write_report` writes the comparison table
and the loss plots into the sweep dir.

Every job returns COMPLETED to Hydra with its :class:`JobRecord` as the return
value (a FAILED return would make Hydra's sweeper raise after the batch); the
record's ``status`` says how the job really ended, and the sweep command exits 1
after the table when any job is not ``ok`` (``sweep.jobs.sweep_exit_status``). Hydra overrides of the sweep
(``hydra.*``) configure the sweep, not the jobs, but for ``hydra.searchpath``.

This module is imported by Hydra's plugin scan in every process that starts
Hydra (every torchrun worker too), so it imports the project lazily.
"""

import logging
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class TorchrunLauncher(Launcher):
    """Runs each multirun job as ``torchrun --standalone --nproc_per_node=N -m dist_supernet.train``.

    Arguments come from ``conf/hydra/launcher/torchrun.yaml``.
    """

    def __init__(self, nproc_per_node: int | None = None, max_restarts: int = 0, timeout_s: float = 3600.0,
                 job_defaults: Sequence[str] = ()) -> None:
        self.nproc_per_node = nproc_per_node
        self.max_restarts = max_restarts
        self.timeout_s = timeout_s
        self.job_defaults = list(job_defaults)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # task_function is not called here: the job's processes run it under torchrun.
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from dist_supernet.sweep.jobs import (default_nproc_per_node, invalid_job, job_hydra_overrides, note_outcome,
                                              run_job, with_defaults)
        from dist_supernet.sweep.report import TABLE_MD, write_report
        from dist_supernet.train.preflight import check_config

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} torchrun jobs one at a time into {sweep_dir}")
        nproc = self.nproc_per_node or default_nproc_per_node()  # the world size of every (standalone) job
        hydra_overrides = job_hydra_overrides(self.config.hydra.overrides.hydra)  # e.g. a plugin's config dir
        returns = []
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            overrides = with_defaults(list(overrides), self.job_defaults)
            job_cfg, job_dir = None, sweep_dir / str(num)
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            try:
                job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
                with open_dict(job_cfg):
                    job_cfg.hydra.job.id = job_cfg.hydra.job.num = num
                job_dir = sweep_dir / str(job_cfg.hydra.sweep.subdir)
                check_config(job_cfg, job_dir, world_size=nproc)  # the app's own pass: supernet.*, model.* too
            except Exception as e:  # noqa: BLE001 -- any composition or validation error is this job's, not the sweep's
                record = invalid_job(num, overrides, job_dir, _first_line(e))
            else:
                record = run_job(num, overrides, job_dir, nproc_per_node=nproc,
                                 max_restarts=self.max_restarts, timeout_s=self.timeout_s,
                                 hydra_overrides=hydra_overrides)
            log.info(f"\t#{num} -> {record.status}" + (f" ({record.reason})" if record.reason else "")
                     + (f" in {record.job_time_s:.1f} s" if record.status != "invalid" else ""))
            note_outcome(record)
            returns.append(JobReturn(overrides=overrides, cfg=job_cfg, working_dir=str(job_dir),
                                     status=JobStatus.COMPLETED, _return_value=record))
        write_report(sweep_dir)
        statuses = [r.return_value.status for r in returns]
        log.info(f"{statuses.count('ok')} ok, {statuses.count('failed')} failed, {statuses.count('invalid')} invalid:"
                 f" {sweep_dir / TABLE_MD}")
        return returns


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
