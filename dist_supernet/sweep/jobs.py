"""One sweep job = one torchrun job: check its config, launch it, record how it ended.

The Hydra launcher (``hydra_plugins/dist_supernet_torchrun``) calls
:func:`run_job` once per job of a multirun, one job at a time (a job already
uses every core it is given). Each job runs::

    torchrun --standalone --nproc_per_node=N -m dist_supernet.train <job overrides> hydra.run.dir=<job dir>

``--standalone`` picks a free rendezvous port, so jobs never collide. Whatever
happens, the job dir ends up with ``sweep_job.json`` (a :class:`JobRecord`)
and, once launched, ``torchrun.log`` (the job's stdout and stderr); the
sweep goes on with the next job.

The sweep command exits 1 (after the table) when any job is ``failed`` or ``invalid``,
so a script or CI step that runs a sweep sees it. Statuses: ``ok`` (exit 0 and a ``summary.json``), ``failed`` (launched; non-zero
exit, killed at the timeout, or no summary), ``invalid`` (the config was
rejected before launch by the app's validation pass, ``train/preflight.py:
check_config``, e.g. ``compression=none compression.collective=two_phase`` in a
cartesian product, or a bad ``supernet.*`` / ``model.*`` value; the reason is its one line).

Example::
    >>> record = run_job(0, ["model=mlp", "trainer.max_steps=3"], Path("multirun/x/0"))  # doctest: +SKIP
    >>> record.status, record.job_time_s                                                 # doctest: +SKIP
    ('ok', 7.9)
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

RECORD_FILE = "sweep_job.json"
LOG_FILE = "torchrun.log"
STATUSES = ("ok", "failed", "invalid")


@dataclasses.dataclass
class JobRecord:
    """How one job of a sweep ended; written to ``<job dir>/sweep_job.json``."""

    num: int                      # Hydra's job number, also the job dir's name by default
    overrides: list[str]          # the job's own overrides, as Hydra's sweeper produced them
    status: str                   # ok | failed | invalid
    reason: str = ""              # one line: why it failed ("" when ok)
    returncode: int | None = None  # torchrun's exit status (None: not launched or killed)
    job_time_s: float = 0.0       # launch to exit, torchrun start-up included
    command: list[str] = dataclasses.field(default_factory=list)

    def save(self, job_dir: Path) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / RECORD_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, job_dir: Path) -> "JobRecord":
        return cls(**json.loads((job_dir / RECORD_FILE).read_text()))


# How the jobs of this process's sweep ended, as the launcher records them (it may run several batches):
# the entry point turns any job that is not ``ok`` into a non-zero exit status, after the table is written.
_OUTCOMES: list[str] = []


def note_outcome(record: JobRecord) -> None:
    """Record one finished (or rejected) job of this process's sweep."""
    _OUTCOMES.append(record.status)


def sweep_exit_status() -> int:
    """0 when every job of this process's sweep was ``ok`` (or none ran), else 1.

    >>> sweep_exit_status()
    0
    """
    return 0 if all(status == "ok" for status in _OUTCOMES) else 1


def default_nproc_per_node() -> int:
    """One process per GPU, else 2 CPU processes (as ``launch/single_node.sh``)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def job_env() -> dict[str, str]:
    """The sweep's environment for a job, minus a parent torchrun's variables, plus the CPU defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    import torch

    if not torch.cuda.is_available():
        # gloo picks the hostname's interface by default, which may not reach itself in a container;
        # one thread per process, as the processes already share the cores.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def with_defaults(overrides: list[str], defaults: list[str]) -> list[str]:
    """``defaults`` (``key=value``) whose key the job does not set, then the job's own overrides.

    >>> with_defaults(["optim.lr=0.1", "trainer.log_every=5"], ["trainer.log_every=1", "trainer.seed=3"])
    ['trainer.seed=3', 'optim.lr=0.1', 'trainer.log_every=5']
    """
    keys = {_override_key(o) for o in overrides}
    return [d for d in defaults if _override_key(d) not in keys] + list(overrides)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


# The sweep's own Hydra overrides that its jobs need to compose the same config: a config dir added to
# the search path (a plugin's conf/compression/<name>.yaml, say) holds group choices the jobs use.
JOB_HYDRA_KEYS = ("hydra.searchpath",)


def job_hydra_overrides(sweep_hydra_overrides) -> list[str]:
    """The sweep's ``hydra.*`` overrides every job gets too (:data:`JOB_HYDRA_KEYS`).

    >>> job_hydra_overrides(["hydra.sweep.dir=x", "hydra.searchpath=[file:///my/conf]"])
    ['hydra.searchpath=[file:///my/conf]']
    """
    return [str(o) for o in sweep_hydra_overrides if _override_key(str(o)) in JOB_HYDRA_KEYS]


def torchrun_command(overrides: list[str], job_dir: Path, *, nproc_per_node: int, max_restarts: int,
                     hydra_overrides: list[str] = ()) -> list[str]:
    """The job's command line; ``hydra.run.dir`` puts every file the job writes in ``job_dir``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            f"--max-restarts={max_restarts}", "-m", "dist_supernet.train", *overrides, *hydra_overrides,
            f"hydra.run.dir={job_dir}"]


def invalid_job(num: int, overrides: list[str], job_dir: Path, reason: str) -> JobRecord:
    """Record a job whose config was rejected before launch."""
    record = JobRecord(num=num, overrides=list(overrides), status="invalid", reason=reason)
    record.save(job_dir)
    return record


def run_job(num: int, overrides: list[str], job_dir: Path, *, nproc_per_node: int | None = None,
            max_restarts: int = 0, timeout_s: float = 3600.0, hydra_overrides: list[str] = ()) -> JobRecord:
    """Run one torchrun job to completion (or ``timeout_s``) and record how it ended.

    The job runs in its own session so that a timeout (or Ctrl-C) stops torchrun
    and all its workers, not just torchrun.
    """
    job_dir = Path(job_dir).absolute()
    job_dir.mkdir(parents=True, exist_ok=True)
    nproc = nproc_per_node or default_nproc_per_node()
    cmd = torchrun_command(list(overrides), job_dir, nproc_per_node=nproc, max_restarts=max_restarts,
                           hydra_overrides=list(hydra_overrides))
    record = JobRecord(num=num, overrides=list(overrides), status="failed", command=cmd)
    start = time.perf_counter()
    with open(job_dir / LOG_FILE, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=job_env(),
                                start_new_session=True)
        try:
            record.returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            record.reason = f"timed out after {timeout_s:g} s (launcher timeout_s); killed"
        except BaseException:  # Ctrl-C: leave no workers behind, then stop the sweep
            _stop(proc)
            raise
    record.job_time_s = round(time.perf_counter() - start, 3)
    if record.returncode == 0 and (job_dir / "summary.json").is_file():
        record.status = "ok"
    elif record.returncode == 0:
        record.reason = "exit 0 but no summary.json"
    elif record.returncode is not None:
        record.reason = failure_reason((job_dir / LOG_FILE).read_text(errors="replace"), record.returncode)
    record.save(job_dir)
    return record


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM torchrun's whole session (it forwards to its workers), SIGKILL after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# A Python exception line: "ValueError: ...", "torch.distributed.DistBackendError: ...".
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b(?::.*)?$")


def failure_reason(log_text: str, returncode: int) -> str:
    """One line for the table: the project's ``error: key=value: reason`` line if a rank printed one,
    else the last exception line of a traceback, else torchrun's exit status.

    >>> failure_reason("x\\nerror: optim.lr=-1.0: must be > 0\\n", 2)
    'exit 2: optim.lr=-1.0: must be > 0'
    >>> failure_reason("Traceback (most recent call last):\\n  ...\\nRuntimeError: boom\\n", 1)
    'exit 1: RuntimeError: boom'
    """
    lines = [line.strip() for line in log_text.splitlines()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return f"exit {returncode}: {errors[-1][len('error: '):]}"
    exceptions = [line for line in lines
                  if _EXCEPTION_LINE.match(line) and not line.startswith("torch.distributed.elastic")]
    if exceptions:
        return f"exit {returncode}: {exceptions[-1][:300]}"
    return f"exit {returncode}: see {LOG_FILE}"
