"""One writer per run directory: a lock file held by rank 0 for the life of the job.

``<run dir>/run.lock`` is locked with ``flock`` (on NFS the kernel turns it
into a lock on the server, so it holds between nodes). The kernel releases it
when the holding process exits in any way, SIGKILL included, so there is no
lock to clean up after a crash. While held, the file records who holds it
(host, pid, start time, job id) so a second job into the same directory can
say who is there:

    error: hydra.run.dir=outputs/run: in use by another job (host node1, pid 4242, started 2026-12-01T11:20:03, torchrun run id 71b0); wait for it to end or choose another hydra.run.dir

A clean exit empties the record. A record found non-empty by the next holder
is stale: that job (or its host) died without a clean exit, and the new job
says so in one warning line before taking over. A record copied along with the
directory (another path) is ignored.

Where the filesystem has no locks (``ENOLCK``), the record alone decides: a
holder on this host counts as alive while its pid runs; a holder on another
host cannot be checked and refuses, naming the file to delete.

Example::
    >>> lock = RunDirLock(Path("outputs/run"))
    >>> stale = lock.acquire()          # ConfigError (one line) if another job holds it
    >>> ...                             # train; only this process writes outputs/run
    >>> lock.release()                  # or just exit: the kernel releases it
"""

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from dist_supernet.train.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
_HELD = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_PROBE_RETRIES = 40  # x 50 ms: outlasts any probe's shared lock


def describe(holder: dict) -> str:
    """``host node1, pid 4242, started 2026-12-01T11:20:03, torchrun run id x`` (what a holder record says)."""
    if not holder:
        return "holder not recorded yet"
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}", f"started {holder.get('started', '?')}"]
    if holder.get("job"):
        parts.append(str(holder["job"]))
    return ", ".join(parts)


def _job_id() -> str | None:
    if os.environ.get("SLURM_JOB_ID"):
        return f"SLURM job {os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun run id {os.environ['TORCHELASTIC_RUN_ID']}"
    return None


def _parse(raw: bytes) -> dict:
    try:
        holder = json.loads(raw.decode() or "{}")
    except ValueError:  # a holder died mid-write: still a holder, unknown details
        return {"host": "?", "pid": "?"} if raw.strip() else {}
    return holder if isinstance(holder, dict) else {}


def _alive_here(holder: dict) -> bool:
    """The holder runs on this host with that pid (and, where /proc tells, the same start time)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return holder.get("start_ticks") in (None, _start_ticks(holder["pid"]))


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class RunDirLock:
    """The lock on one run directory (``key`` names it in messages: ``hydra.run.dir`` or ``trainer.checkpoint_dir``)."""

    def __init__(self, directory: str | Path, *, key: str = "hydra.run.dir"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.key = key
        self._fd: int | None = None

    def _busy(self, holder: dict, extra: str = "") -> ConfigError:
        return ConfigError(self.key, str(self.directory),
                           f"in use by another job ({describe(holder)}){extra}; wait for it to end or choose "
                           f"another {self.key}")

    def acquire(self) -> dict | None:
        """Take the lock for this process; returns the stale holder record found (None if it was clean).

        Raises ConfigError naming the directory and the holder when another job holds it.
        """
        from dist_supernet.train.preflight import os_error_problem

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(self.key, str(self.directory), _open_problem(self.path, e, os_error_problem)) from None
        try:
            locks_work = self._lock(fd)
            previous = _parse(os.pread(fd, 1 << 16, 0))
            if previous.get("dir") not in (None, str(self.directory.resolve())):
                previous = {}  # copied along with the directory: not a holder of this one
            if not locks_work and previous:
                if previous.get("host") != socket.gethostname():
                    raise self._busy(previous, f"; this filesystem has no locks, so a holder on another host "
                                               f"cannot be checked: delete {self.path} if it is gone")
                if _alive_here(previous):
                    raise self._busy(previous)
            me = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "job": _job_id(),
                  "dir": str(self.directory.resolve())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return previous or None

    def _lock(self, fd: int) -> bool:
        """flock, or ConfigError naming the holder; False where the filesystem has no locks."""
        for _ in range(_PROBE_RETRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as e:
                if e.errno in _UNSUPPORTED:
                    return False
                if e.errno not in _HELD:
                    raise
                holder = _parse(os.pread(fd, 1 << 16, 0))
                if holder:
                    raise self._busy(holder) from None
            # Locked with an empty record: another job's probe (check_free), held for microseconds.
            time.sleep(0.05)
        raise self._busy({})

    def release(self) -> None:
        """Empty the record (a clean exit) and unlock. Idempotent."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # never unlink: a waiter may hold the old inode open
            os.fsync(self._fd)
        except OSError:
            pass
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def check_free(directory: str | Path, *, key: str = "hydra.run.dir") -> None:
    """ConfigError if another job holds ``directory`` now.

    A probe: takes and drops a *shared* lock (probes of all ranks may run at once), creates nothing.
    """
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except IsADirectoryError as e:  # would fail the job later, after torchrun started: say it now
        raise ConfigError(key, str(directory), _open_problem(path, e, str)) from None
    except OSError:  # no lock file (or no directory): nobody has run here, or it is not ours to judge
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _HELD:
                raise RunDirLock(directory, key=key)._busy(_parse(os.pread(fd, 1 << 16, 0))) from None
            if e.errno not in _UNSUPPORTED:
                raise
            holder = _parse(os.pread(fd, 1 << 16, 0))
            if holder and (holder.get("host") != socket.gethostname() or _alive_here(holder)):
                raise RunDirLock(directory, key=key)._busy(holder) from None
    finally:
        os.close(fd)


def _open_problem(path: Path, error: OSError, describe) -> str:
    if isinstance(error, IsADirectoryError) or path.is_dir():
        return (f"{path} is a directory, not this project's lock file; remove it (or choose another directory) "
                "so that the job can lock its run directory")
    return f"cannot open its lock file {path}: {describe(error)}"


def report_stale(lock: RunDirLock, previous: dict | None) -> None:
    """One warning line for a stale holder record (rank 0, after ``acquire``)."""
    if previous:
        log.warning("%s=%s: the previous job here (%s) ended without releasing it (killed, or its host died); "
                    "taking over", lock.key, lock.directory, describe(previous))


def unfinished_runs(output_dir: Path) -> list[tuple[Path, int]]:
    """Sibling run directories of ``output_dir`` with checkpoints, no ``summary.json`` and no live holder.

    (directory, newest checkpoint step), newest directory first: what a crash or a preemption left, which a
    fresh ``outputs/<stamp>`` run would otherwise silently start over from.
    """
    parent, found = Path(output_dir).resolve().parent, []
    try:
        siblings = [p for p in parent.iterdir() if p.is_dir() and p.resolve() != Path(output_dir).resolve()]
    except OSError:
        return []
    for run in siblings:
        ckpts = run / "checkpoints"
        if (run / "summary.json").exists() or not ckpts.is_dir():
            continue
        steps = [int(p.name[5:].split(".")[0]) for p in ckpts.iterdir()
                 if p.name.startswith("step_") and p.name[5:].split(".")[0].isdigit()]
        if not steps:
            continue
        try:
            check_free(run)
        except ConfigError:  # still running: not left behind
            continue
        found.append((run, max(steps), run.stat().st_mtime))
    return [(run, step) for run, step, _ in sorted(found, key=lambda f: f[2], reverse=True)]


def report_unfinished_runs(output_dir: Path) -> None:
    """Rank 0 of a run starting at step 0: one warning naming the newest unfinished sibling and how to resume it.

    README command 1 makes a new ``outputs/<stamp>`` each time; after a crash or a
    preemption this is where the user learns that the previous run's checkpoints exist.
    """
    found = unfinished_runs(output_dir)
    if not found:
        return
    run, step = found[0]
    others = f" ({len(found) - 1} older unfinished runs beside it)" if len(found) > 1 else ""
    log.warning("starting at step 0 in %s; %s stopped at step %d without finishing%s: to continue it instead, "
                "stop this job and rerun the same command with hydra.run.dir=%s", output_dir, run, step, others, run)
