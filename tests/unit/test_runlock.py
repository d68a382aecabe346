"""The run-directory lock (dist_supernet/train/runlock.py) with a real second process holding it.

A forked child takes the lock and is SIGKILLed: the kernel releases it, the
next holder reports the stale record. Filesystems without locks (ENOLCK) fall
back on the record: a live holder on this host refuses, a dead one is taken
over, one on another host refuses naming the file to delete.
"""

import errno
import fcntl
import json
import logging
import os
import signal
import socket

import pytest

from dist_supernet.train import runlock
from dist_supernet.train.config import ConfigError
from dist_supernet.train.runlock import LOCK_NAME, RunDirLock, check_free, report_stale, unfinished_runs


def _hold_in_child(directory) -> int:
    """A child process that takes the lock, says so through a pipe, and sleeps; returns its pid."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            RunDirLock(directory).acquire()
            os.write(write_fd, b"1")
            signal.pause()
        finally:
            os._exit(0)
    os.close(write_fd)
    assert os.read(read_fd, 1) == b"1"
    os.close(read_fd)
    return pid


def test_a_held_directory_is_refused_naming_the_holder_and_a_killed_holder_is_reported_stale(tmp_path, caplog):
    pid = _hold_in_child(tmp_path)
    try:
        for attempt in (lambda: RunDirLock(tmp_path).acquire(), lambda: check_free(tmp_path)):
            with pytest.raises(ConfigError) as error:
                attempt()
            assert str(error.value).startswith(f"hydra.run.dir={tmp_path}: in use by another job (host "
                                               f"{socket.gethostname()}, pid {pid}, started ")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    lock = RunDirLock(tmp_path)
    previous = lock.acquire()  # the kernel released the dead child's lock; its record is stale
    assert previous["pid"] == pid
    with caplog.at_level(logging.WARNING):
        report_stale(lock, previous)
    assert f"the previous job here (host {socket.gethostname()}, pid {pid}," in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # a clean exit leaves no record
    lock = RunDirLock(tmp_path)
    assert lock.acquire() is None
    lock.release()


def test_a_record_copied_with_the_directory_is_not_a_holder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "dir": "/some/other/run"}))
    lock = RunDirLock(tmp_path / "a")
    assert lock.acquire() is None
    lock.release()


def test_without_filesystem_locks_the_record_decides(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    try:
        record = {"host": socket.gethostname(), "pid": pid, "dir": str(tmp_path.resolve())}
        (tmp_path / LOCK_NAME).write_text(json.dumps(record))
        with pytest.raises(ConfigError, match=f"pid {pid}"):
            RunDirLock(tmp_path).acquire()  # alive on this host
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert RunDirLock(tmp_path).acquire()["pid"] == pid  # dead: taken over, reported stale
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(record, host="node-gone")))
    with pytest.raises(ConfigError, match=f"cannot be checked: delete {tmp_path / LOCK_NAME} if it is gone"):
        RunDirLock(tmp_path).acquire()


def test_unfinished_sibling_runs_are_found_newest_first(tmp_path):
    def run(name, steps, finished=False):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        for s in steps:
            (tmp_path / name / "checkpoints" / f"step_{s:08d}.pt").write_bytes(b"")
        if finished:
            (tmp_path / name / "summary.json").write_text("{}")
        return tmp_path / name

    old, new = run("2026-01-01_10-00-00", [10, 20]), run("2026-01-01_11-00-00", [5])
    os.utime(old, (1, 1))
    run("done", [30], finished=True)
    run("empty", [])
    me = tmp_path / "2026-01-01_12-00-00"
    me.mkdir()
    assert unfinished_runs(me) == [(new.resolve(), 5), (old.resolve(), 20)]
    pid = _hold_in_child(new)  # still running: not left behind
    try:
        assert unfinished_runs(me) == [(old.resolve(), 20)]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert runlock.unfinished_runs(tmp_path / "done") == [(new.resolve(), 5), (old.resolve(), 20)]
