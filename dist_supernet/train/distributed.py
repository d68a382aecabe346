"""Process-group plumbing for the trainer: init, one output directory, sums, parameter hashes.

Runs under torchrun (env:// rendezvous) or as a single plain process (a
world of one on an in-memory store), on NCCL with one GPU per process or on
gloo on CPU.
"""

import hashlib
import logging
import os
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
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=device if use_cuda else None)
    else:  # `python -m dist_supernet.train`: a world of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


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
