"""Training jobs launched by the tests: torchrun, the launcher, or one process; to the end or in the background.

One copy for every test that starts ``dist_supernet.train`` (or the sweep) as real
processes: the environment a job gets (gloo on loopback, 1 thread, this checkout
first, nothing inherited from a torchrun the tests might run under), the commands,
:func:`run` (to the end, output captured) and :class:`Job` (in the background, each
output line with its arrival time, to measure how long a fault takes to be
reported). ``worker_pids`` finds torchrun's workers (``RANK`` in their environment)
so a test can signal one; ``kill_tree`` leaves nothing of the job running.

Example::
    >>> job = Job(torchrun(*PLAIN, "trainer.max_steps=20", f"hydra.run.dir={run_dir}"), cwd=tmp_path, jobs=jobs)
    >>> wait_for_step(run_dir, 10, job)
    >>> os.kill(job.worker_pids()[1], signal.SIGTERM)
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180
# Not Birder (the point here is processes, not the optimizer): DDP's fp32 all-reduce and AdamW, an MLP.
PLAIN = ["model=mlp", "compression=none", "optim=adamw", "trainer.eval_every=0"]
JOB_MARKER = "DIST_SUPERNET_TEST_JOB"  # in every process of a Job: kill_tree signals only those


def env(**extra: str) -> dict:
    """The environment of a launched job: this one without torchrun's or a parent run's variables.

    ``TORCHELASTIC_*``, ``RANK``, ``WORLD_SIZE`` and ``DIST_SUPERNET_RUN*`` (a run stamp shared by one
    job's ranks) are dropped, so a test never joins an outer job; gloo on ``lo``, 1 OpenMP thread,
    this checkout on PYTHONPATH, ``NPROC=2`` for the launcher scripts; ``extra`` last.
    """
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "DIST_SUPERNET_RUN")) and k not in ("RANK", "WORLD_SIZE")}
    out.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), NPROC="2")
    out.update(extra)
    return out


def torchrun(*overrides: str, nproc: int = 2, max_restarts: int = 0) -> list[str]:
    """``torchrun --standalone --nproc_per_node=<nproc> -m dist_supernet.train <overrides>``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "dist_supernet.train", *overrides]


def launcher(*overrides: str) -> list[str]:
    """README command 1: ``bash launch/single_node.sh`` (pre-flight, then ``exec torchrun``)."""
    return ["bash", str(REPO / "launch" / "single_node.sh"), *overrides]


def single(*overrides: str) -> list[str]:
    """One plain process, no torchrun: ``python -m dist_supernet.train <overrides>``."""
    return [sys.executable, "-m", "dist_supernet.train", *overrides]


def run(cmd: list[str], *, cwd: Path, timeout_s: float = TIMEOUT_S, check: bool = False,
        **extra_env: str) -> subprocess.CompletedProcess:
    """``cmd`` to the end in :func:`env`, stdout and stderr captured apart; with check, it must exit 0."""
    out = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout_s)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def descendants(pid: int) -> list[int]:
    """Every process under ``pid``, each before its own children."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in open(f"/proc/{pid}/task/{task}/children").read().split():
                found += [int(child), *descendants(int(child))]
    except OSError:  # already gone
        pass
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


class Job:
    """``cmd`` in the background, stdout and stderr merged, each line with its arrival time.

    ``jobs``: a list the job appends itself to, for the test's cleanup (:func:`kill_all`);
    ``new_session``: start it as a process group of its own (for a Ctrl-C, ``os.killpg``).
    """

    def __init__(self, cmd: list[str], *, cwd: Path, jobs: list | None = None, new_session: bool = False):
        self._marker = f"{JOB_MARKER}={uuid.uuid4().hex}".encode()
        key, value = self._marker.decode().split("=", 1)
        # new_session: the job is a process group of its own, so os.killpg(job.proc.pid, SIGINT) is a
        # terminal's Ctrl-C (every process of the job gets it) without reaching the test itself.
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env(**{key: value}), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=new_session)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._pids: set[int] = set()
        if jobs is not None:
            jobs.append(self)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def worker_pids(self) -> dict[int, int]:
        """{rank: pid} of the outermost processes under this job that have RANK in their environment."""
        pids = {}
        for pid in descendants(self.proc.pid):
            rank = next((int(e[5:]) for e in _environ(pid) if e.startswith(b"RANK=")), None)
            if rank is not None:
                pids.setdefault(rank, pid)  # a worker before its own children (which inherit RANK)
        self._pids.update(pids.values())
        return pids

    def wait_for_line(self, pattern: str, *, after: float = 0.0, timeout_s: float = 60) -> tuple[float, str]:
        """(arrival time, line) of the first output line at or after ``after`` that matches ``pattern``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for when, line in list(self.lines):
                if when >= after and re.search(pattern, line):
                    return when, line
            time.sleep(0.01)
        raise AssertionError(f"no line matching {pattern!r} in {timeout_s}s:\n{self.text[-3000:]}")

    def wait(self, timeout_s: float = TIMEOUT_S) -> int:
        """The exit status; a job still running after timeout_s is killed and fails the test."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise AssertionError(f"job still running after {timeout_s}s:\n{self.text[-3000:]}") from None
        self._reader.join(timeout=10)
        return rc

    def kill_tree(self) -> None:
        """SIGKILL the job and everything under it, including workers it has lost (orphans).

        Only processes that carry this job's marker in their environment are signalled: a pid
        recorded earlier may belong to someone else by now.
        """
        for pid in [*descendants(self.proc.pid), *self._pids]:
            if self._marker in _environ(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def kill_all(jobs: list) -> None:
    """kill_tree every job of the list, emptying it: a test's cleanup leaves nothing running."""
    while jobs:
        jobs.pop().kill_tree()


def rows(run_dir: Path) -> list[dict]:
    """The metrics rows of a run (none before its first row)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(summary.json, metrics rows) of a finished run."""
    return json.loads((run_dir / "summary.json").read_text()), rows(run_dir)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars of a run directory's event files, ``{tag: [(step, value), ...]}`` by step.

    Read the way TensorBoard reads them (EventAccumulator, which applies a resumed run's purge).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return {tag: sorted((event.step, event.value) for event in accumulator.Scalars(tag))
            for tag in accumulator.Tags()["scalars"]}


def wait_for_step(run_dir: Path, step: int, job: Job, timeout_s: float = 120) -> int:
    """Poll metrics.jsonl until it shows ``step`` or later; returns the step it shows."""
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert job.proc.poll() is None, f"job ended early:\n{job.text[-3000:]}"
        if path.is_file():
            lines = path.read_text().splitlines()
            if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        time.sleep(0.002)  # the fault tests signal a worker right after the step: poll often
    raise AssertionError(f"step {step} not reached in {timeout_s}s:\n{job.text[-3000:]}")


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the checkpoints in ``directory`` (``step_N.pt`` files or ``step_N`` directories)."""
    found = set()
    for p in directory.iterdir() if directory.is_dir() else []:
        m = re.match(r"^step_(\d+)(\.pt)?$", p.name)
        if m:
            found.add(int(m.group(1)))
    return sorted(found)
