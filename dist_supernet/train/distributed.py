"""Process-group plumbing for the trainer: init, one output directory, sums, parameter hashes.

Runs under torchrun (env:// rendezvous) or as a single plain process (a
world of one on an in-memory store), on NCCL with one GPU per process or on
gloo on CPU.
"""

import hashlib
import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def init_distributed(device_choice: str = "auto") -> torch.device:
    """Init the default process group; returns this rank's device.

    ``auto`` picks ``cuda:<LOCAL_RANK>`` with NCCL when CUDA is present, else
    CPU with gloo (set ``GLOO_SOCKET_IFNAME=lo`` on a single machine).
    """
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    device_id = device if use_cuda else None
    if "WORLD_SIZE" not in os.environ:  # `python -m dist_supernet.train`: a world of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif _restarted_on_shared_store():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False, timeout=timedelta(minutes=10))
        # torchrun's store outlives a restart and still holds the previous attempt's gloo/NCCL
        # addresses under the same keys (pytorch/pytorch#135712): without a fresh prefix a
        # restarted rank can read a dead peer's address and fail to connect.
        store = dist.PrefixStore(f"dist_supernet/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, device_id=device_id)
    else:
        dist.init_process_group(backend, device_id=device_id)
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


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (any picklable value)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def agree_on_output_dir(local_dir: Path) -> Path:
    """Rank 0's output directory on every rank (warns where Hydra chose another one)."""
    chosen = Path(broadcast_object(str(local_dir)))
    if chosen.resolve() != Path(local_dir).resolve():
        log.warning("output dir %s differs from rank 0's; using %s (pass hydra.run.dir=... to fix it)",
                    local_dir, chosen)
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a few numbers (float64: byte counts stay exact to 2**53)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def params_sha256(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in ``named_parameters`` order."""
    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
