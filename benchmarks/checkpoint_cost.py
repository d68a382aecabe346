"""What does one checkpoint cost, old path vs torch.distributed.checkpoint (issue 12)?

**Question.** Saving and loading a checkpoint of a P-parameter model trained
with Birder on n ranks (x, and each rank's own m and b: 12 bytes per parameter
per rank in memory): peak memory on rank 0, bytes on disk per rank, seconds.

- ``old`` (the trainer before ea8c304, reimplemented here): every rank's m, b
  gathered to rank 0 (``consolidate_state_dict``: an ``[n, 2, T]`` tensor),
  rank 0 ``torch.save``s everything into one file (temporary, fsync, rename),
  hashes it, writes the manifest; on load rank 0 checks the hash and EVERY
  rank ``torch.load``s the whole file (all ranks' m, b) and keeps its row.
- ``dcp``: ``CheckpointManager`` (dist_supernet/train/checkpoint.py), as the
  trainer uses it: each rank writes its own m, b and a share of the model
  (replicated, one copy on disk), hashes its own files; on load every rank
  verifies a share of the files, then reads only what it needs, in place.
- ``dcp-async``: the same with ``dcp.async_save``; ``save s`` is the time the
  training loop is blocked (staging a CPU copy), ``commit s`` until the files
  are written, hashed and renamed.

The model is ``nn.Sequential`` of bias-free ``Linear(d, d)`` layers (fp32);
m, b are random per rank. Peak RSS is rank 0's ``VmHWM`` over the phase
(reset through ``/proc/self/clear_refs`` before it), so it includes the
live x, m, b (12 B/param) every rank holds anyway; ``+peak`` is the excess
over the RSS just before the phase. The load reads from the page cache (the
save just wrote the files), the same for both paths.

Run from the repository root (about 6 minutes on 2 cores for the default)::

    python benchmarks/checkpoint_cost.py                       # 100M params, 2 and 4 ranks
    python benchmarks/checkpoint_cost.py --params 1e6 --worlds 2 --out /tmp/x.md   # smoke test

Before each configuration the script checks MemAvailable: the old load holds
the whole file on every rank (n x (4 + 8n) bytes per parameter in all), and a
configuration that would not fit in half the available memory is run with
fewer parameters, which the results say.
"""

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402


def _reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS; return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class _Phase:
    """Wall seconds (max over ranks, after a barrier) and rank 0's peak RSS of one phase."""

    def __enter__(self):
        dist.barrier()
        self.base = _reset_peak()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.local_s = time.perf_counter() - self.start
        self.peak = _status("VmHWM")
        dist.barrier()
        self.seconds = time.perf_counter() - self.start
        return False


def _model(num_params: int) -> nn.Module:
    width = 1024  # 1M parameters per layer
    layers = max(1, round(num_params / width**2))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# -- the old path (trainer.save_checkpoint / _resume before ea8c304) ----------------------------------


def _old_save(directory: Path, model, m, b, step: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    flat = torch.stack([m, b])
    rows = [torch.empty_like(flat) for _ in range(world)] if rank == 0 else None
    dist.gather(flat, gather_list=rows, dst=0)  # consolidate_state_dict(to=0)
    if rank == 0:
        state = {"step": step, "world_size": world, "model": model.state_dict(),
                 "optimizer": {"birder": {"per_rank": torch.stack(rows)}}}
        path = directory / f"step_{step:08d}.pt"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        manifest = {"step": step, "world_size": world, "sha256": digest.hexdigest(), "file": path.name}
        path.with_suffix(".json").write_text(json.dumps(manifest))
        del state, rows
    dist.barrier()  # the others wait in the next collective while rank 0 writes


def _old_load(directory: Path, model, m, b, step: int) -> None:
    rank = dist.get_rank()
    path = directory / f"step_{step:08d}.pt"
    ok = [None]
    if rank == 0:  # find_latest: the sha256 of the whole file, on rank 0
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        ok[0] = digest.hexdigest() == json.loads(path.with_suffix(".json").read_text())["sha256"]
    dist.broadcast_object_list(ok, src=0)
    assert ok[0]
    state = torch.load(path, map_location="cpu", weights_only=True)  # every rank: the whole file
    model.load_state_dict(state["model"])
    row = state["optimizer"]["birder"]["per_rank"][rank]
    m.copy_(row[0])
    b.copy_(row[1])
    del state, row


# -- the new path ----------------------------------------------------------------------------------------


class _RankState:
    """This rank's m, b as a Stateful (what BirderRankState hands DCP, without a Birder)."""

    def __init__(self, m, b):
        self.m, self.b = m, b

    def state_dict(self):
        return {"m": self.m, "b": self.b}

    def load_state_dict(self, state):
        self.m.copy_(state["m"])
        self.b.copy_(state["b"])


def _worker(rank, world, init_file, method, num_params, directory, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    from dist_supernet.train.checkpoint import CheckpointManager, ModelState, StatefulGroup, rank_key

    directory = Path(directory)
    model = _model(num_params)
    numel = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(rank)
    m = torch.randn(numel, generator=g)
    b = m.abs() + torch.rand(numel, generator=g)
    # A strided sample and the sums: checks the load without holding a second copy (8 B/param).
    expected = (m[::997].clone(), b[::997].clone(), float(m.sum()), float(b.sum()))
    row = {}
    if method == "old":
        with _Phase() as save:
            _old_save(directory, model, m, b, step=1)
        m.zero_()
        b.zero_()
        with _Phase() as load:
            _old_load(directory, model, m, b, step=1)
        files = {"rank0 file": (directory / "step_00000001.pt").stat().st_size}
    else:
        ckpts = CheckpointManager(directory, keep=2, async_save=method == "dcp-async")
        per_rank = {"optimizer": _RankState(m, b)}
        with _Phase() as save:
            ckpts.save({"model": ModelState(model)}, per_rank, step=1, blocking=method == "dcp")
        with _Phase() as commit:
            ckpts.wait()
        row["commit_s"] = commit.seconds
        m.zero_()
        b.zero_()
        with _Phase() as load:
            found = ckpts.find_latest()
            ckpts.load(found, {"model": ModelState(model), rank_key(rank): StatefulGroup(per_rank)})
        files = {p.name: p.stat().st_size for p in sorted((directory / "step_00000001").iterdir())}
    assert torch.equal(m[::997], expected[0]) and torch.equal(b[::997], expected[1]), "load is wrong"
    assert (float(m.sum()), float(b.sum())) == expected[2:], "load is wrong"
    if rank == 0:
        row.update(save_s=save.seconds, load_s=load.seconds, save_peak=save.peak, save_base=save.base,
                   load_peak=load.peak, load_base=load.base, files=files, numel=numel)
        results.put(row)
    dist.barrier()
    dist.destroy_process_group()


def run(method: str, world: int, num_params: int, root: Path) -> dict:
    directory = Path(tempfile.mkdtemp(dir=root, prefix=f"{method}_{world}_"))
    init_file = directory / "rendezvous"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, str(init_file), method, num_params, str(directory), results))
             for r in range(world)]
    for p in procs:
        p.start()
    row = results.get(timeout=3600)
    for p in procs:
        p.join(timeout=600)
        if p.exitcode != 0:
            raise RuntimeError(f"{method} on {world} ranks: a worker exited with {p.exitcode}")
    shutil.rmtree(directory, ignore_errors=True)
    return row


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def _fits(world: int, num_params: float) -> float:
    """Parameters for this world size such that the old load (the heaviest phase) fits in half of MemAvailable."""
    per_param = world * (12 + 4 + 8 * world)  # live x, m, b + the whole file (model + n ranks' m, b) on every rank
    return min(num_params, 0.5 * _mem_available() / per_param)


def _loads() -> list[str]:
    """The load averages as the table prints them: two decimals each."""
    return [f"{load:.2f}" for load in common.load_average()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=["old", "dcp", "dcp-async"])
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary dir)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_cost_"))
    root.mkdir(parents=True, exist_ok=True)
    cpu = common.cpu_name()
    loads = [_loads()]
    rows, notes = [], []
    for world in args.worlds:
        num_params = int(_fits(world, args.params))
        if num_params < args.params:
            notes.append(f"{world} ranks: {num_params / 1e6:.0f}M parameters instead of {args.params / 1e6:.0f}M "
                         f"(the old load would need {world * (12 + 4 + 8 * world) * args.params / 2**30:.1f} GiB; "
                         f"MemAvailable {_mem_available() / 2**30:.1f} GiB)")
        for method in args.methods:
            row = run(method, world, num_params, root)
            row.update(method=method, world=world)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "files"}), flush=True)
        loads.append(_loads())
    shutil.rmtree(root, ignore_errors=True)

    mib = 2**20
    lines = ["# Checkpoint cost: old (gather to rank 0 + torch.save) vs torch.distributed.checkpoint",
             "",
             f"{common.today()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, gloo on loopback, "
             f"`{common.command_line('checkpoint_cost.py')}`.",
             f"The machine is shared with other engineers' jobs: load average (1, 5, 15 min) before and after each "
             f"world size: {', '.join('/'.join(x) for x in loads)}. Timings are noisy; memory and bytes are not.",
             "", *[f"- {n}" for n in notes], "",
             "| ranks | params | path | save s | commit s | load s | rank 0 peak RSS save (+over before) | "
             "rank 0 peak RSS load (+over before) | bytes on disk per rank |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        files = r["files"]
        if r["method"] == "old":
            per_rank = f"rank 0: {files['rank0 file'] / mib:.0f} MiB, others 0"
        else:
            sizes = [files.get(f"__{k}_0.distcp", 0) / mib for k in range(r["world"])]
            per_rank = ", ".join(f"{s:.0f}" for s in sizes) + f" MiB (+ .metadata {files['.metadata'] / 1024:.0f} KiB)"
        commit = f"{r['commit_s']:.2f}" if r["method"] == "dcp-async" else "-"
        lines.append(f"| {r['world']} | {r['numel'] / 1e6:.0f}M | {r['method']} | {r['save_s']:.2f} | {commit} | "
                     f"{r['load_s']:.2f} | {r['save_peak'] / mib:.0f} MiB (+{(r['save_peak'] - r['save_base']) / mib:.0f}) | "
                     f"{r['load_peak'] / mib:.0f} MiB (+{(r['load_peak'] - r['load_base']) / mib:.0f}) | {per_rank} |")
    lines += ["", "Live state per rank before either phase: x, m, b = 12 bytes per parameter. "
              "`old` needs on rank 0 n x 8 B/param more to save (the gathered m, b) and every rank "
              "(4 + 8n) B/param more to load (the whole file); `dcp` needs neither. `dcp-async` stages a CPU copy "
              "of this rank's state (x + m + b) while the loop goes on."]
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else common.results_path("checkpoint_cost")
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
