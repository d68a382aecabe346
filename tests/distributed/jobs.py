"""A training job in the background for the process-fault tests: torchrun, the launcher, or one process.

Lines of its output arrive with their time (to measure how long a fault takes
to be reported); ``worker_pids`` finds torchrun's workers (``RANK`` in their
environment) so a test can signal one; ``kill_tree`` leaves nothing running.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180
# Not Birder (the point here is processes, not the optimizer): DDP's fp32 all-reduce and AdamW, an MLP.
PLAIN = ["model=mlp", "compression=none", "optim=adamw", "trainer.eval_every=0"]


def env() -> dict:
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "DIST_SUPERNET_RUN")) and k not in ("RANK", "WORLD_SIZE")}
    out.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), NPROC="2")
    return out


def torchrun(*overrides, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={max_restarts}", "-m", "dist_supernet.train", *overrides]


def launcher(*overrides) -> list[str]:
    """README command 1: ``bash launch/single_node.sh`` (pre-flight, then ``exec torchrun``)."""
    return ["bash", str(REPO / "launch" / "single_node.sh"), *overrides]


def single(*overrides) -> list[str]:
    return [sys.executable, "-m", "dist_supernet.train", *overrides]


def descendants(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in open(f"/proc/{pid}/task/{task}/children").read().split():
                found += [int(child), *descendants(int(child))]
    except OSError:
        pass
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Job:
    """``cmd`` in the background, stdout and stderr merged, each line with its arrival time."""

    def __init__(self, cmd: list[str], *, cwd: Path, jobs: list | None = None):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
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
        """{rank: pid} of the processes under this job that have RANK in their environment."""
        pids = {}
        for pid in descendants(self.proc.pid):
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                pids[rank] = pid
        self._pids.update(pids.values())
        return pids

    def wait_for_line(self, pattern: str, *, after: float = 0.0, timeout_s: float = 60) -> tuple[float, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for when, line in list(self.lines):
                if when >= after and re.search(pattern, line):
                    return when, line
            time.sleep(0.01)
        raise AssertionError(f"no line matching {pattern!r} in {timeout_s}s:\n{self.text[-3000:]}")

    def wait(self, timeout_s: float = TIMEOUT_S) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise AssertionError(f"job still running after {timeout_s}s:\n{self.text[-3000:]}") from None
        self._reader.join(timeout=10)
        return rc

    def kill_tree(self) -> None:
        """SIGKILL the job and everything under it, including workers it has lost (orphans)."""
        for pid in [*descendants(self.proc.pid), *self._pids, self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_step(run_dir: Path, step: int, job: Job, timeout_s: float = 120) -> int:
    """Poll metrics.jsonl until it shows ``step`` or later; returns the step it shows."""
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert job.proc.poll() is None, f"job ended early:\n{job.text[-3000:]}"
        if path.is_file():
            lines = path.read_text().splitlines()
            if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached in {timeout_s}s:\n{job.text[-3000:]}")


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the checkpoints in ``directory`` (``step_N.pt`` files or ``step_N`` directories)."""
    found = set()
    for p in directory.iterdir() if directory.is_dir() else []:
        m = re.match(r"^step_(\d+)(\.pt)?$", p.name)
        if m:
            found.add(int(m.group(1)))
    return sorted(found)
