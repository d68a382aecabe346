"""Hydra multirun sweeps in which every job is a torchrun job, summarised in one table and plots.

    python -m dist_supernet.train --multirun model=mlp compression=none,birder optim.lr=1e-3,3e-3

``conf/train.yaml`` makes ``hydra/launcher=torchrun`` (the plugin in
``hydra_plugins/dist_supernet_torchrun``) the launcher of every multirun; it
runs the jobs with :func:`run_job` and ends with :func:`write_report`.
"""

from dist_supernet.sweep.jobs import JobRecord, run_job
from dist_supernet.sweep.report import JobResult, collect, write_report

__all__ = ["JobRecord", "JobResult", "collect", "run_job", "write_report"]
