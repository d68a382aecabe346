"""Validate Birder's GPU path on one GPU: kernels at size, the hook's streams and host syncs, replicas.

Run by ``benchmarks/gpu_check.sh OUT_DIR`` (tests/kernels compiled, kernel GB/s, then this script).
Parts (``--parts``, default all):

- ``kernels``: every kernel at 2**24 + 3 elements (several segments) against the torch reference on
  the same device: exact bits / m / b / x on head and tail slices and as a whole.
- ``hook``: the hook with CUDA tensors at world size 1 on NCCL: a 50M-parameter MLP, 30 steps with
  the Triton kernels and again with ``DIST_SUPERNET_KERNELS=torch`` (parameters must be equal), host
  syncs counted with ``torch.cuda.set_sync_debug_mode`` by thread (the hook runs on ``birder-comm``),
  a profiler trace (Chrome JSON) and the CUDA streams that backward's GEMMs and the hook's kernels
  ran on, step-1 vs step-10 time, and DDP fp32's step time beside Birder's.
- ``replicas``: 2 processes sharing the GPU over gloo with CUDA tensors, for every collective:
  parameters bit-identical after 5 steps. NCCL refuses two ranks on one GPU, so multi-rank NCCL is
  NOT checked here (the output says so).

``--device cpu --small`` runs the same code on CPU with small sizes (a smoke test of the script).
Writes ``OUT_DIR/gpu_check.json`` and ``gpu_check.md``.
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from dist_supernet import kernels  # noqa: E402
from dist_supernet.kernels import reference as ref  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_kernels(device, numel) -> dict:
    """Each kernel of the Birder step at ``numel`` elements vs the reference on the same device."""
    results = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    sizes = [numel // 3, 1, numel - numel // 3 - 1 - 5, 5]  # 4 segments, odd sizes, one of 1 element
    starts = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)), dtype=torch.int64, device=device)
    # The state is canonical and flat: the segments take it in another order than the chunk's.
    canon = torch.tensor([sizes[3] + sizes[1], sizes[3], sizes[3] + sizes[1] + sizes[0], 0], dtype=torch.int64,
                         device=device)
    g = torch.randn(numel, generator=gen).to(device)
    g[::97] *= 1e-3
    m0 = (torch.randn(numel, generator=gen) * 0.1).to(device)
    b0 = (m0.abs() + torch.rand(numel, generator=gen)).to(device)
    head, tail = slice(0, 4096), slice(numel - 4096, numel)

    def same(a, b):
        return {"all": bool(torch.equal(a, b)), "head": bool(torch.equal(a[head], b[head])) if a.numel() >= 8192 else None,
                "tail": bool(torch.equal(a[-4096:], b[-4096:])) if a.numel() >= 8192 else None}

    m_ref, b_ref, m_k, b_k = m0.clone(), b0.clone(), m0.clone(), b0.clone()
    flag_ref = torch.zeros(1, dtype=torch.uint8, device=device)
    flag_k = torch.zeros(1, dtype=torch.uint8, device=device)
    bits_ref = ref.compress(g, m_ref, b_ref, starts, canon, beta=0.9, seed=123, flag=flag_ref)
    bits_k = kernels.compress(g, m_k, b_k, starts, canon, beta=0.9, seed=123, flag=flag_k)
    _sync(device)
    results["compress/bits"] = same(bits_k, bits_ref)
    results["compress/m"] = same(m_k, m_ref)
    results["compress/b"] = same(b_k, b_ref)
    counts = torch.randint(0, 3, (numel,), generator=gen, dtype=torch.int32).to(device)
    results["requantize"] = same(kernels.requantize(counts, 2, starts, canon, 0, seed=5),
                                 ref.requantize(counts, 2, starts, canon, 0, seed=5))
    rows = torch.stack([bits_ref, bits_ref.flip(0)])
    results["unpack_counts"] = same(kernels.unpack_counts(rows, numel), ref.unpack_counts(rows, numel))
    planes = ref.pack_counts(counts, 2)
    results["pack_counts"] = same(kernels.pack_counts(counts, 2), planes)
    results["unpack_planes"] = same(kernels.unpack_planes(planes, numel), ref.unpack_planes(planes, numel))
    xs_ref = [torch.randn(n, generator=gen).to(device) for n in sizes]
    xs_k = [x.clone() for x in xs_ref]
    lr = torch.full((4,), 1e-3, dtype=torch.float32, device=device)
    wd = torch.tensor([0.0, 0.1, 0.01, 0.0], dtype=torch.float32, device=device)
    ref.apply_packed_(xs_ref, starts, canon, rows, planes=False, num_rows=2, lr_P=lr, wd_P=wd)
    kernels.apply_packed_(xs_k, starts, canon, rows, planes=False, num_rows=2, lr_P=lr, wd_P=wd)
    _sync(device)
    results["apply_packed_"] = same(torch.cat(xs_k), torch.cat(xs_ref))
    results["numel"] = numel
    return results


def _mlp(width, depth):
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


class _SyncCounter:
    """Counts CUDA host-sync warnings (set_sync_debug_mode="warn") by the thread that raised them."""

    def __init__(self):
        self.by_thread = {}
        self._lock = threading.Lock()

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message).lower():
                with self._lock:
                    name = threading.current_thread().name
                    self.by_thread[name] = self.by_thread.get(name, 0) + 1

        warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        warnings.showwarning = self._show
        self._catch.__exit__(*exc)


def _train(device, method, width, depth, steps, out_dir, trace):
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from dist_supernet import Birder

    torch.manual_seed(0)
    model = _mlp(width, depth).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if method == "fp32":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    else:
        opt = Birder(ddp, lr=1e-3, collective="two_phase")
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(256, width, generator=gen).to(device)
    y = torch.randint(0, 10, (256,), generator=gen).to(device)
    times, syncs = [], None
    for step in range(steps):
        _sync(device)
        start = time.perf_counter()
        counting = device.type == "cuda" and step == steps - 2
        if counting:
            torch.cuda.set_sync_debug_mode("warn")
        with (_SyncCounter() if counting else _Null()) as counter:
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device) if not counting else None
        if counting:
            torch.cuda.set_sync_debug_mode("default")
            syncs = counter.by_thread
        _sync(device)
        times.append(time.perf_counter() - start)
    flat = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])  # before the traced steps
    streams = None
    if trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(2):
                F.cross_entropy(ddp(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            _sync(device)
        path = out_dir / f"trace_{method}.json"
        prof.export_chrome_trace(str(path))
        streams = _kernel_streams(path)
    return {"step_s": times, "syncs_by_thread": syncs, "streams": streams, "params": flat}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _kernel_streams(path):
    """GPU kernels per stream from a Chrome trace: the hook's (Triton ``_*_kernel``) vs GEMMs (backward)."""
    events = json.loads(path.read_text()).get("traceEvents", [])
    by_stream = {}
    for e in events:
        if e.get("cat") != "kernel":
            continue
        stream = e.get("args", {}).get("stream", e.get("tid"))
        kind = "birder" if "_kernel" in e.get("name", "") else ("gemm" if "gemm" in e.get("name", "").lower() else "other")
        by_stream.setdefault(str(stream), {}).setdefault(kind, 0)
        by_stream[str(stream)][kind] += 1
    birder = {s for s, kinds in by_stream.items() if kinds.get("birder")}
    gemm = {s for s, kinds in by_stream.items() if kinds.get("gemm")}
    return {"by_stream": by_stream, "hook_on_own_stream": bool(birder) and not (birder & gemm)}


def check_hook(device, small, out_dir) -> dict:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29701")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    width, depth, steps = (256, 2, 12) if small else (2896, 6, 30)  # 6 x 2896^2 ~ 50M parameters
    try:
        birder = _train(device, "birder", width, depth, steps, out_dir, trace=True)
        fp32 = _train(device, "fp32", width, depth, steps, out_dir, trace=False)
        previous = os.environ.get("DIST_SUPERNET_KERNELS")
        kernels.set_backend("torch")
        torch_path = _train(device, "birder", width, depth, steps, out_dir, trace=False)
        kernels.set_backend(previous or "auto")
    finally:
        dist.destroy_process_group()
    num_params = sum(p.numel() for p in _mlp(width, depth).parameters())
    med = lambda ts: statistics.median(ts[2:])  # noqa: E731
    return {
        "num_params": num_params,
        "steps": steps,
        "params_equal_torch_path": bool(torch.equal(birder["params"], torch_path["params"])),
        "host_syncs_by_thread_one_step": birder["syncs_by_thread"],
        "host_syncs_in_hook": (birder["syncs_by_thread"] or {}).get("birder-comm"),
        "streams": birder["streams"],
        "step1_s": birder["step_s"][0], "step10_s": birder["step_s"][min(9, steps - 1)],
        "birder_median_s": med(birder["step_s"]), "fp32_median_s": med(fp32["step_s"]),
        "birder_vs_fp32": med(birder["step_s"]) / med(fp32["step_s"]),
    }


def _replica_variants() -> list:
    """(name, Birder kwargs): every registered 1-bit collective (2 simulated nodes where it builds node
    groups), then the option forms with their own code paths."""
    from dist_supernet.comm.collectives import COLLECTIVES

    variants = [(name, {"collective": name, **({"num_nodes": 2} if cls.needs_node_groups else {})})
                for name, cls in COLLECTIVES.items()]
    if "two_phase" in COLLECTIVES:
        variants.append(("two_phase+requantize", {"collective": "two_phase", "requantize": True}))
    if "hierarchical" in COLLECTIVES:
        variants.append(("hierarchical_rs", {"collective": "hierarchical", "num_nodes": 2,
                                             "inter_node": "reduce_scatter"}))
    return variants


def _replica_worker(rank, world_size, device_type, port, out):
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from dist_supernet import Birder

    common.init_loopback_gloo(rank, world_size, port)
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    results = {}
    for name, kwargs in _replica_variants():
        try:
            torch.manual_seed(0)
            model = _mlp(128, 2).to(device)
            ddp = DistributedDataParallel(model, bucket_cap_mb=0.05)
            opt = Birder(ddp, lr=1e-2, **kwargs)
            gen = torch.Generator().manual_seed(rank)
            for _ in range(5):
                x = torch.randn(32, 128, generator=gen).to(device)
                y = torch.randint(0, 10, (32,), generator=gen).to(device)
                F.cross_entropy(ddp(x), y).backward()
                opt.step()
                opt.zero_grad()
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
            rows = [torch.empty_like(flat) for _ in range(world_size)]
            dist.all_gather(rows, flat)
            results[name] = all(torch.equal(rows[0], r) for r in rows)
        except Exception as error:  # reported per collective: gloo's CUDA support differs by collective
            results[name] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def check_replicas(device) -> dict:
    result = common.spawn_gloo(_replica_worker, 2, device.type, 29711)
    result["note"] = ("2 processes share one GPU over gloo with CUDA tensors; NCCL refuses two ranks on one GPU, "
                      "so multi-rank NCCL is not checked by this script")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small sizes (CPU smoke test of the script)")
    parser.add_argument("--parts", default="kernels,hook,replicas")
    args = parser.parse_args(argv)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device(args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                           "triton": _version("triton"), "backend": kernels.backend_for(torch.empty(0, device=device))}}
    parts = args.parts.split(",")
    for part, fn in [("kernels", lambda: check_kernels(device, 4097 * 3 if args.small else 2**24 + 3)),
                     ("hook", lambda: check_hook(device, args.small, args.out_dir)),
                     ("replicas", lambda: check_replicas(device))]:
        if part not in parts:
            continue
        start = time.perf_counter()
        try:
            report[part] = fn()
        except Exception as error:  # a failed part is reported, the others still run
            report[part] = {"error": f"{type(error).__name__}: {error}"}
        report[part + "_seconds"] = round(time.perf_counter() - start, 1)
        print(part, json.dumps(report[part], default=str)[:2000], flush=True)
    (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out_dir / 'gpu_check.json'}")
    return report


def _version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
