"""Process-group plumbing for the trainer: init, one output directory, sums, parameter hashes,
and the two process faults a worker must notice itself: preemption (SIGTERM) and a dead torchrun agent.

Runs under torchrun (env:// rendezvous) or as a single plain process (a
world of one on an in-memory store), on NCCL with one GPU per process or on
gloo on CPU.
"""

import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dist_supernet.comm.collectives import CollectiveError
from dist_supernet.optim.compressor import local

log = logging.getLogger(__name__)


def init_distributed(device_choice: str = "auto", timeout_s: float | None = None) -> torch.device:
    """Init the default process group; returns this rank's device.

    ``auto`` picks ``cuda:<LOCAL_RANK>`` with NCCL when CUDA is present, else
    CPU with gloo (set ``GLOO_SOCKET_IFNAME=lo`` on a single machine).
    ``timeout_s`` bounds every collective on the default group (a stopped peer
    fails it instead of hanging); None keeps torch's default (30 min on gloo).
    A default group that exists already (a caller running several trainers in one
    process group, as ``benchmarks/time_to_accuracy_worker.py`` does) is used as it is.
    """
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        return device
    backend = "nccl" if use_cuda else "gloo"
    device_id = device if use_cuda else None
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=float(timeout_s))}
    if "WORLD_SIZE" not in os.environ:  # `python -m dist_supernet.train`: a world of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **timeout)
    elif _restarted_on_shared_store():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False, timeout=timedelta(minutes=10))
        # torchrun's store outlives a restart and still holds the previous attempt's gloo/NCCL
        # addresses under the same keys (pytorch/pytorch#135712): without a fresh prefix a
        # restarted rank can read a dead peer's address and fail to connect.
        store = dist.PrefixStore(f"dist_supernet/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, device_id=device_id,
                                **timeout)
    else:
        dist.init_process_group(backend, device_id=device_id, **timeout)
    return device


def _restarted_on_shared_store() -> bool:
    """Under a single torchrun agent that shares its store with the workers.

    TORCHELASTIC_RESTART_COUNT agrees between ranks only with one agent; with
    several (multi-node) it can differ, so there launch/ sets
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and torch makes a fresh store per attempt.
    """
    return (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and os.environ.get("GROUP_WORLD_SIZE", "1") == "1"
        and "TORCHELASTIC_RESTART_COUNT" in os.environ
    )


def _collective(stage: str, fn):
    """Run a default-group collective; a failure (a stopped or dead peer: timeout) names the stage and rank."""
    try:
        return fn()
    except Exception as error:  # re-raised with the stage named; the cause is chained
        raise CollectiveError(f"trainer collective failed in stage '{stage}' (world) on rank {dist.get_rank()} "
                              f"of {dist.get_world_size()}: {error}") from error


# What gloo and NCCL say when a peer is stopped or gone (their errors are plain RuntimeErrors).
_PEER_FAILURE = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "NCCL")


@contextlib.contextmanager
def collective_stage(stage: str):
    """Name ``stage`` and this rank in any peer failure inside (e.g. DDP's own broadcasts and all-reduces).

    Errors that already name their stage, and errors that are not peer failures, pass unchanged.
    """
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        if "collective failed in stage" in text or not (isinstance(error, dist.DistError)
                                                        or any(s in text for s in _PEER_FAILURE)):
            raise
        raise CollectiveError(f"trainer collective failed in stage '{stage}' (world) on rank {dist.get_rank()} "
                              f"of {dist.get_world_size()}: {text}") from error


def broadcast_object(obj, src: int = 0, *, stage: str = "broadcast"):
    """``obj`` from rank ``src`` on every rank (any picklable value)."""
    holder = [obj]
    _collective(stage, lambda: dist.broadcast_object_list(holder, src=src))
    return holder[0]


def agree_on_output_dir(local_dir: Path) -> Path:
    """Rank 0's output directory on every rank (warns where Hydra chose another one)."""
    chosen = Path(broadcast_object(str(local_dir)))
    if chosen.resolve() != Path(local_dir).resolve():
        log.warning("output dir %s differs from rank 0's; using %s (pass hydra.run.dir=... to fix it)",
                    local_dir, chosen)
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def all_reduce_sum(values: list[float], device: torch.device, *, stage: str = "all-reduce") -> list[float]:
    """Element-wise sum over ranks of a few numbers (float64: byte counts stay exact to 2**53)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _collective(stage, lambda: dist.all_reduce(t))
    return t.tolist()


def all_gather_object(obj, *, stage: str = "all-gather") -> list:
    out = [None] * dist.get_world_size()
    _collective(stage, lambda: dist.all_gather_object(out, obj))
    return out


def params_sha256(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes this rank holds (an FSDP2 DTensor: its local shard), in
    ``named_parameters`` order."""
    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        digest.update(name.encode())
        digest.update(local(p).detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensors_sha256(tensors) -> str:
    """sha256 of the bytes of ``tensors``, in order (e.g. Birder's m and b)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- preemption and orphaned workers -------------------------------------------------------

EXIT_PREEMPTED = 143  # why: 128 + SIGTERM, what schedulers and shells expect from a job stopped by SIGTERM


class Preempted(Exception):
    """Raised by ``Trainer.fit`` on every rank after the checkpoint of a step at which some rank had SIGTERM/SIGINT."""

    def __init__(self, step: int, signal_name: str):
        self.step, self.signal_name = step, signal_name
        # 128 + the signal: 143 for SIGTERM, 130 for SIGINT (what shells report for a job stopped by it)
        self.exit_status = 128 + int(getattr(signal.Signals, signal_name, signal.SIGTERM))
        super().__init__(f"{signal_name} at step {step}: checkpoint written, stopping")


class PreemptionFlag:
    """SIGTERM sets a flag (nothing else happens in the handler); :meth:`agreed` ORs it over ranks.

    SLURM and Kubernetes send SIGTERM before SIGKILL; torchrun forwards it to its
    workers and SIGKILLs them 30 s later. Ctrl-C in a terminal sends SIGINT to the
    launcher's whole process group (torchrun and every worker): it is handled the
    same way (a second Ctrl-C stops at once, as usual). Every rank finishes the step it is in,
    then all agree in one 1-element all-reduce per step, so all of them stop
    after the same step (a lone SIGTERM, e.g. to one worker, stops them all too).

    Example::
        flag = PreemptionFlag()           # main thread, after the process group exists
        ...                               # a step
        if flag.agreed(device, stage="stop flag"):
            save_checkpoint(); raise Preempted(step, flag.signal_name)
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received: int | None = None
        self.received_at: float | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()
        elif signum == signal.SIGINT == self.received:  # Ctrl-C twice: stop now, as Python would
            raise KeyboardInterrupt

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "SIGTERM"

    def agreed(self, device: torch.device, *, stage: str = "stop flag") -> bool:
        """True on every rank when any rank has received the signal (collective on the default group)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.get_world_size() > 1:
            _collective(stage, lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX))
        if flag.item() and self.received is None:
            self.received = signal.SIGTERM  # another rank's signal
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def start_orphan_watchdog(poll_s: float = 1.0) -> threading.Thread | None:
    """Under torchrun: stop this worker within ``poll_s`` once its agent (the parent process) is gone.

    When the agent is SIGKILLed (the OOM killer, ``kill -9`` of the launcher) its
    workers are reparented and would train on, writing into the run directory
    that a relaunch then shares with them. The parent pid changing is the signal;
    no store or network is involved. Returns the daemon thread (None outside torchrun).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    parent = os.getppid()
    rank = os.environ.get("RANK", "?")

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"error: rank {rank}: torchrun's agent (pid {parent}) is gone; stopping this worker so that "
                      f"a relaunch is the only writer of its run directory", file=sys.stderr, flush=True)
                os._exit(1)

    thread = threading.Thread(target=watch, name="orphan-watchdog", daemon=True)
    thread.start()
    return thread
