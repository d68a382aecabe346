"""Issue 13, item 4: SIGTERM (preemption) loses nothing; the rerun ends bit-identical to an uninterrupted run.

Real processes, a real signal, through README command 1 (``launch/single_node.sh``):
SIGTERM to ONE worker only (the hard case: the other rank must learn of it),
and still every rank finishes its step, all checkpoint the same step and exit
143, torchrun exits non-zero. (SIGTERM to torchrun itself, what Kubernetes
sends to an ``exec``-ing launcher, reaches every worker: torchrun forwards it
and waits 30 s before SIGKILL; checked by hand, docs/reliability.md.) A fresh
run started beside the interrupted one names it and the override that resumes
it. The rerun's final parameters and every metrics row equal the uninterrupted run's.
"""

import json
import os
import re
import signal
import time

from tests.distributed.jobs import PLAIN, Job, checkpoint_steps, launcher, rows, torchrun, wait_for_step
from tests.fault_report import record

STEPS = 120
RUN = [*PLAIN, f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.checkpoint_every=1000",
       "trainer.batch_size=16"]


def _stopped_step(job: Job, after: float) -> tuple[float, int]:
    when, line = job.wait_for_line(r"stopped: SIGTERM at step \d+: checkpoint written", after=after)
    assert "exit status 143" in line, line
    return when, int(re.search(r"at step (\d+)", line).group(1))


def _logged_stop_steps(run_dir, num_ranks=2) -> list[list[int]]:
    return [[int(s) for s in re.findall(r"stopped: SIGTERM at step (\d+)", (run_dir / f"train_rank{r}.log").read_text())]
            for r in range(num_ranks)]


def test_sigterm_checkpoints_every_rank_at_one_step_and_the_rerun_ends_bit_identical(tmp_path, jobs):
    run_dir, ref_dir = tmp_path / "run", tmp_path / "reference"

    # 1. README command 1; after step 30, SIGTERM to rank 1 only.
    job = Job(launcher(*RUN, f"hydra.run.dir={run_dir}"), cwd=tmp_path, jobs=jobs)
    seen = wait_for_step(run_dir, 30, job)
    sent_at = time.monotonic()
    os.kill(job.worker_pids()[1], signal.SIGTERM)
    rc = job.wait()
    reported_at, first_stop = _stopped_step(job, sent_at)
    assert rc != 0, job.text[-3000:]
    assert seen <= first_stop < STEPS and first_stop in checkpoint_steps(run_dir / "checkpoints"), job.text[-3000:]
    assert _logged_stop_steps(run_dir) == [[first_stop], [first_stop]]  # both ranks, the same step
    assert [r["step"] for r in rows(run_dir)] == list(range(1, first_stop + 1))
    assert not (run_dir / "summary.json").exists()
    record("SIGTERM to one worker (rank 1), launcher", detected_s=round(reported_at - sent_at, 2), sent_after_step=seen,
           checkpoint_step=first_stop, steps_lost=0, torchrun_rc=rc)

    # 2. A fresh run beside it (README command 1 makes a new directory each time) says where the
    #    unfinished one is and how to continue it. It is the uninterrupted reference run.
    ref = Job(torchrun(*RUN, f"hydra.run.dir={ref_dir}"), cwd=tmp_path, jobs=jobs)
    assert ref.wait() == 0, ref.text[-3000:]
    _, hint = ref.wait_for_line(r"starting at step 0 in ")
    assert f"{run_dir} stopped at step {first_stop} without finishing" in hint, hint
    assert f"rerun the same command with hydra.run.dir={run_dir}" in hint, hint

    # 3. The rerun finishes: every step once, every row and the final parameters as uninterrupted.
    job = Job(torchrun(*RUN, f"hydra.run.dir={run_dir}"), cwd=tmp_path, jobs=jobs)
    assert job.wait() == 0, job.text[-3000:]
    job.wait_for_line(rf"resumed from .* at step {first_stop}\b")
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((ref_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == first_stop and summary["params_in_sync"]
    assert summary["params_sha256"] == reference["params_sha256"]
    got, want = rows(run_dir), rows(ref_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert got == [dict(r, wall_time_s=g["wall_time_s"], train_time_s=g["train_time_s"]) for r, g in zip(want, got)]
    record("SIGTERM, then resumed to the end", runs_resumed=1, bit_identical=True,
           model_state_bytes=4 * summary["num_params"], model_state_bytes_lost=0)


def test_ctrl_c_checkpoints_like_sigterm(tmp_path, jobs):
    """Issue 22: Ctrl-C (SIGINT to the launcher's process group: torchrun and every worker) used to end in a
    KeyboardInterrupt traceback from each rank and no checkpoint. Now it is SIGTERM's path: every rank finishes
    its step, one checkpoint of that step, one line, exit status 130 from the workers."""
    run_dir = tmp_path / "run"
    # torchrun itself, in a session of its own: launch/*.sh exec torchrun, so a terminal's Ctrl-C reaches the
    # same processes (torchrun and its workers); the launcher's pre-flight would only add its start-up here.
    job = Job(torchrun(*PLAIN, "trainer.max_steps=100000", "trainer.log_every=1", "trainer.checkpoint_every=1000",
                       "trainer.batch_size=16", f"hydra.run.dir={run_dir}"), cwd=tmp_path, jobs=jobs, new_session=True)
    seen = wait_for_step(run_dir, 5, job)
    sent_at = time.monotonic()
    os.killpg(job.proc.pid, signal.SIGINT)
    rc = job.wait()
    reported_at, line = job.wait_for_line(r"stopped: SIGINT at step \d+: checkpoint written", after=sent_at)
    stop = int(re.search(r"at step (\d+)", line).group(1))
    assert "exit status 130" in line, line
    assert rc != 0 and seen <= stop and checkpoint_steps(run_dir / "checkpoints") == [stop], job.text[-3000:]
    assert [r["step"] for r in rows(run_dir)] == list(range(1, stop + 1))
    assert "KeyboardInterrupt" not in job.text and not re.search(r'File ".*dist_supernet', job.text), job.text[-3000:]
    record("Ctrl-C (SIGINT to torchrun's process group)", detected_s=round(reported_at - sent_at, 2),
           checkpoint_step=stop, steps_lost=0, torchrun_rc=rc)
