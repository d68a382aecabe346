"""Issue 13, item 1: one writer per run directory, through real processes.

Job A trains. A second job into the same directory, through README command 1
(the launcher's pre-flight) and as a plain ``python -m dist_supernet.train``,
refuses in one line naming the directory and A's holder, exit status 2,
before writing anything there; so does a job in another directory whose
``trainer.checkpoint_dir`` is A's. Then A's torchrun agent is SIGKILLed (what the
OOM killer or ``kill -9`` of the launcher does): its workers notice and stop
instead of training on as orphans, and a relaunch into the directory resumes
from A's checkpoint as its only writer: every logged step exactly once.
"""

import json
import os
import signal
import socket
import time

from tests.distributed.jobs import PLAIN, Job, alive, launcher, rows, single, torchrun, wait_for_step
from tests.fault_report import record

# A constant LR: the relaunch may stop at another max_steps without changing the steps before it.
RUN = [*PLAIN, "optim.schedule=constant", "trainer.log_every=10", "trainer.checkpoint_every=50",
       "trainer.batch_size=16"]


def test_a_second_job_is_refused_orphans_stop_and_the_relaunch_is_the_only_writer(tmp_path, jobs):
    run_dir = tmp_path / "run"
    a = Job(torchrun(*RUN, "trainer.max_steps=1000000", f"hydra.run.dir={run_dir}"), cwd=tmp_path, jobs=jobs)
    wait_for_step(run_dir, 60, a)
    holder_pid = a.worker_pids()[0]
    overrides_before = (run_dir / ".hydra" / "overrides.yaml").read_text()

    # 1. Two more jobs into the same directory: one line each, exit 2, nothing written there.
    holder = f"in use by another job (host {socket.gethostname()}, pid {holder_pid}, started "
    for name, cmd in (("launcher", launcher), ("plain process", single)):
        started = time.monotonic()
        b = Job(cmd(*RUN, "trainer.max_steps=10", f"hydra.run.dir={run_dir}"), cwd=tmp_path, jobs=jobs)
        rc = b.wait()
        elapsed = time.monotonic() - started
        lines = b.text.strip().splitlines()
        assert rc == 2 and len(lines) == 1, b.text[-3000:]
        assert lines[0].startswith(f"error: hydra.run.dir={run_dir}: {holder}"), lines
        assert lines[0].endswith("; wait for it to end or choose another hydra.run.dir"), lines
        record(f"second job into a held run dir ({name})", detected_s=round(elapsed, 1),
               note="whole process, start to exit 2")
    # Another run directory, but A's checkpoint directory: refused by the trainer's own lock, before training.
    other = tmp_path / "other"
    b = Job(single(*RUN, "trainer.max_steps=10", f"hydra.run.dir={other}",
                   f"trainer.checkpoint_dir={run_dir / 'checkpoints'}"), cwd=tmp_path, jobs=jobs)
    assert b.wait() == 2, b.text[-3000:]
    errors = [line for line in b.text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: trainer.checkpoint_dir={run_dir / 'checkpoints'}: {holder}")
    assert "Traceback" not in b.text and not (other / "metrics.jsonl").exists()
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides_before
    assert a.proc.poll() is None, a.text[-3000:]  # A is untouched

    # 2. kill -9 of A's torchrun agent: the workers stop by themselves.
    workers = a.worker_pids()
    killed_at = time.monotonic()
    os.kill(a.proc.pid, signal.SIGKILL)
    while any(alive(pid) for pid in workers.values()) and time.monotonic() - killed_at < 30:
        time.sleep(0.02)
    stopped_s = time.monotonic() - killed_at
    assert not any(alive(pid) for pid in workers.values()), "orphaned workers still training 30 s after the kill"
    a.wait_for_line(r"torchrun's agent \(pid \d+\) is gone; stopping this worker", after=killed_at, timeout_s=5)
    last_step = rows(run_dir)[-1]["step"]
    time.sleep(0.5)
    assert rows(run_dir)[-1]["step"] == last_step  # nobody writes any more
    record("torchrun agent SIGKILLed (orphaned workers)", detected_s=round(stopped_s, 2), killed_after_step=last_step)

    # 3. The relaunch takes the directory over and resumes from A's last checkpoint.
    end = last_step + 40
    c = Job(torchrun(*RUN, f"trainer.max_steps={end}", f"hydra.run.dir={run_dir}"), cwd=tmp_path, jobs=jobs)
    assert c.wait() == 0, c.text[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # The last complete checkpoint: the one at last_step itself may have been cut by the kill.
    assert summary["resumed_from_step"] is not None and last_step - 50 <= summary["resumed_from_step"] <= last_step
    steps = [r["step"] for r in rows(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == end  # every logged step once, in order
    assert steps == list(range(10, end + 1, 10))
    assert (run_dir / "run.lock").read_text() == ""  # released on a clean exit
