"""How many bytes per parameter does Birder keep between steps, and what does one step peak at, next to AdamW?

Question (issue 9): Birder's algorithm needs m and b, 8 bytes per parameter
like AdamW; everything else the optimizer and its DDP hook keep should be
noise. This script trains a 10.5M-parameter MLP for a few steps on 2 gloo
processes (real DDP, the 1-bit hook attached) and then walks every object the
optimizer reaches (its state, the hook state, the compressor, cached chunk
tables, queued results), counting each tensor storage once and leaving out
the parameters and gradients. It also reports the peak resident memory of the
steps above the resident memory before them, per rank, for each optimizer
in its own pair of processes.

Usage::

    python benchmarks/state_bytes.py                       # birder and adamw, this checkout
    python benchmarks/state_bytes.py --parallelism ddp,hsdp   # and under FSDP2 (2 pretend nodes x 2 ranks)
    python benchmarks/state_bytes.py --tree /path/to/old/checkout --label before   # another checkout

Writes ``benchmarks/results/state_bytes_<date>.md`` (appends one section per run).
"""

import argparse
import gc
import os
import resource
import sys
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent


def _tensors_reachable(root, exclude_ptrs):
    """Unique tensor storages reachable from ``root`` (attributes, dicts, lists, tuples, closures)."""
    import torch

    seen_objects, storages = set(), {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if hasattr(obj, "to_local"):  # a DTensor (FSDP2): its local shard holds the bytes
                obj = obj.to_local()
            if obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in exclude_ptrs:
                storages[ptr] = storage.nbytes()
            continue
        if isinstance(obj, (torch.nn.Module, type, str, bytes, int, float, bool)) or obj is None:
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("dist_supernet", "torch"):
            if isinstance(obj, torch.distributed.ProcessGroup):
                continue
            stack.extend(vars(obj).values())
    return storages


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank, world_size, optimizer_name, parallelism, tree, port, out):
    sys.path.insert(0, tree)
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    common.init_loopback_gloo(rank, world_size, port)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                                torch.nn.ReLU(), torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 10))
    num_params = sum(p.numel() for p in model.parameters())
    if parallelism == "hsdp":  # 2 pretend nodes x 2 ranks: each rank holds half of every layer
        from torch.distributed.fsdp import fully_shard

        from dist_supernet.optim.fsdp import hsdp_mesh

        mesh = hsdp_mesh("cpu", num_nodes=2)
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh["shard"])
        ddp = fully_shard(model, mesh=mesh["shard"])
    else:
        ddp = DistributedDataParallel(model)
    if optimizer_name == "birder":
        from dist_supernet import Birder

        opt = Birder(model.parameters(), lr=1e-3)
        opt.attach(ddp, **({"mesh": mesh} if parallelism == "hsdp" else {}))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(32, 1024, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    # One step first (the hook's buckets are rebuilt after it, the state is allocated), then measure.
    F.cross_entropy(ddp(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    before = _rss_bytes()
    for _ in range(4):
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    exclude = {p.untyped_storage().data_ptr() for p in local}
    storages = _tensors_reachable(opt, exclude)
    persistent = sum(storages.values())
    out[rank] = {"num_params": num_params, "persistent_bytes": persistent, "bytes_per_param": persistent / num_params,
                 "local_params": sum(p.numel() for p in local),
                 "num_storages": len(storages), "step_peak_over_before_mb": max(0, peak - before) / 2**20,
                 "rss_before_mb": before / 2**20, "peak_rss_mb": peak / 2**20}
    dist.destroy_process_group()


def measure(optimizer_name, parallelism, tree, port):
    return common.spawn_gloo(_worker, 4 if parallelism == "hsdp" else 2, optimizer_name, parallelism, tree, port)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(HERE.parent), help="checkout whose dist_supernet is measured")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--optimizers", default="birder,adamw")
    parser.add_argument("--parallelism", default="ddp",
                        help="comma-separated: ddp (2 processes) and/or hsdp (FSDP2, 2 pretend nodes x 2 ranks)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    rows = []
    for j, parallelism in enumerate(args.parallelism.split(",")):
        for i, name in enumerate(args.optimizers.split(",")):
            result = measure(name, parallelism, args.tree, 29610 + 10 * j + i)
            rows.append((f"{name}, {parallelism}", result[0]))
            print(name, parallelism, result[0], flush=True)
    cpu = common.cpu_name()
    date = common.today()
    path = Path(args.output or common.results_path("state_bytes", date=date))
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write("# Birder's persistent state and one step's peak memory, next to AdamW\n\n"
                    "`python benchmarks/state_bytes.py` (10.5M-parameter MLP, DDP on 2 gloo processes, rank 0 shown; "
                    "persistent = every tensor storage the optimizer reaches after 5 steps, parameters and "
                    "gradients excluded; peak = max RSS during 4 steps minus RSS before them).\n\n")
        f.write(f"## {args.label} — {date}, {cpu}, load average {common.load_average()[0]:.2f}\n\n")
        f.write("| optimizer, parallelism | parameters | on this rank | persistent bytes | bytes/param | "
                "bytes/local param | storages | step peak over before (MiB) | peak RSS (MiB) |\n")
        f.write("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
        for name, r in rows:
            f.write(f"| {name} | {r['num_params']:,} | {r['local_params']:,} | {r['persistent_bytes']:,} | "
                    f"{r['bytes_per_param']:.3f} | {r['persistent_bytes'] / r['local_params']:.3f} | "
                    f"{r['num_storages']} | {r['step_peak_over_before_mb']:.1f} | {r['peak_rss_mb']:.0f} |\n")
        f.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
