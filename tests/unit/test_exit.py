"""The CLI's end: a hung teardown of the process groups does not keep a finished job alive."""

import subprocess
import sys
import textwrap
import time

import pytest

HUNG_CLOSE = textwrap.dedent("""
    import sys, time
    from dist_supernet.train import __main__ as cli

    class Trainer:
        def close(self):
            time.sleep(600)  # a deadlocked destroy_process_group

    status = int(sys.argv[1])
    try:
        if status:
            raise SystemExit(status)
    finally:
        cli._close_within(Trainer(), 1.0)
    print("not reached")
""")


@pytest.mark.parametrize("status", [0, 143])
def test_a_hung_close_ends_the_process_with_the_runs_status(status):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HUNG_CLOSE, str(status)], capture_output=True, text=True,
                          timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == status, done.stderr
    assert "not reached" not in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "warning: shutting down the process groups took over 1 s; exiting"


def test_exit_now_flushes_and_keeps_sys_exit_text():
    code = "import sys; from dist_supernet.train import __main__ as cli; print('kept', end=''); cli._exit_now('bad run')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr.strip()) == (1, "kept", "bad run")
