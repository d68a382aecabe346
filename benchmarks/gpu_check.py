"""Validate Birder's GPU path on one GPU, one part per call; every part merges its figures into gpu_check.json.

Run by ``bash benchmarks/gpu_check.sh OUT_DIR`` (docs/gpu.md), which gives each part its own
timeout. Parts (``--part``):

- ``env``: torch, CUDA, Triton, the GPU (name, memory, SMs), whether hydra imports.
- ``kernels``: every kernel at 2**24 + 3 elements (4 segments, canonical order shuffled) against
  the torch reference on the same device, bit for bit (bits, m, b, flag, counts, means, x): fp32
  and bf16 gradients, rows and planes payloads, fp32 / bf16 / fp16 parameters; the means and the
  re-quantization for every row count 1-16, 20 and 33 (CUDA's ``tensor / int`` is 1 ulp off at
  6, 7, 10-15, ...) against the CPU reference too. Default configs (``DIST_SUPERNET_AUTOTUNE=0``).
- ``hook``: world size 1 on NCCL, a 50M-parameter MLP: Birder's warm-up (its time; the keys it
  tuned against the keys training launched), host syncs counted by thread in backward and in
  ``step()`` separately, the CUDA streams of the hook's own Triton kernels (by name) against
  backward's GEMMs and ``step()``'s apply, step 1 vs step 10, Birder's step against DDP fp32's,
  and the parameters after the steps against the same run on the torch reference path.
- ``collectives``: 2 and 4 processes sharing the GPU over gloo with CUDA tensors, every collective
  (hierarchical as 2 nodes x 1 and 2 nodes x 2, both inter-node forms): each exchange (packed
  result, m, b, flag, applied x) bit for bit against the same exchange of CPU tensors on the torch
  reference, and across ranks; then DDP replicas bit-identical after 4 steps.
- ``app``: the training application (Hydra) on the GPU, a few steps.

``--device cpu --small`` runs the same code on CPU at small sizes (tests/unit/test_gpu_check_script.py).
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from dist_supernet import kernels  # noqa: E402
from dist_supernet.kernels import reference as ref  # noqa: E402

PARTS = ("env", "kernels", "hook", "collectives", "app")
RESULTS = "gpu_check.json"
# The Triton kernels the hook runs on its own stream (compress, then the collectives' decoders and
# re-quantization); step() applies on the default stream by design.
HOOK_KERNELS = ("_compress_kernel", "_requantize_kernel", "_unpack_counts_kernel", "_pack_counts_kernel")
STEP_KERNELS = ("_apply_packed_kernel",)
# What the checked code (this script, bench_kernels.py, tests/kernels, the training app) imports that the device
# image lacks: carried as wheels (benchmarks/gpu_wheels.sh). Pinned to the versions tested here.
CARRIED_WHEELS = {"hydra": "hydra-core==1.3.8", "omegaconf": "omegaconf==2.3.1", "antlr4": "antlr4-python3-runtime==4.9.3"}
# Import names the device image provides (its package list, read 2026-11-17) among those the checked code imports.
IMAGE_MODULES = {"attr", "certifi", "colorama", "cython_runtime", "iniconfig", "llvmlite", "matplotlib", "numba",
                 "numpy", "packaging", "pluggy", "py", "pygments", "pytest", "scipy", "sklearn", "torch", "torchgen",
                 "tqdm", "triton", "typing_extensions", "yaml", "PIL", "kiwisolver", "cycler", "fontTools",
                 "pyparsing", "dateutil", "six", "contourpy", "joblib", "threadpoolctl", "jinja2", "markupsafe",
                 "sympy", "mpmath", "networkx", "filelock", "fsspec", "charset_normalizer", "cloudpickle",
                 "mpl_toolkits", "narwhals", "pandas", "psutil", "rich"}
ROW_COUNTS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 33)
CPU_PREFIX = 1 << 18  # elements compared with the CPU reference too (it hashes at ~300 ns per element)
GEMM_NAMES = ("gemm", "nvjet", "xmma", "cutlass")  # cuBLAS / cuBLASLt kernel names (nvjet: Hopper)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def merge_result(out_dir: Path, part: str, result, seconds: float | None = None) -> dict:
    """Write ``result`` under ``part`` into OUT_DIR/gpu_check.json (read, update, atomic replace); returns it all."""
    path = Path(out_dir) / RESULTS
    report = json.loads(path.read_text()) if path.is_file() else {}
    report[part] = result
    if seconds is not None:
        report[part + "_seconds"] = round(seconds, 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)
    return report


def _same(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))


# -- env ------------------------------------------------------------------------------------

def check_env(device) -> dict:
    result = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
              "triton": _version("triton"), "numba": _version("numba"), "hydra": _version("hydra"),
              "omegaconf": _version("omegaconf"), "backend": kernels.backend_for(torch.empty(0, device=device))}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                      multiprocessors=props.multi_processor_count, capability=list(torch.cuda.get_device_capability()))
    return result


def _version(name):
    try:
        return getattr(__import__(name), "__version__", "?")
    except Exception:  # absent, or broken: either way not usable
        return None


# -- kernels ----------------------------------------------------------------------------------

def check_kernels(device, numel) -> dict:
    """Every kernel at ``numel`` elements against the reference on the same device; the divisions against CPU too."""
    results = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    sizes = [numel // 3, 1, numel - numel // 3 - 1 - 5, 5]  # 4 segments, odd sizes, one of 1 element
    starts, canon = ref.index_map(sizes, [sizes[3] + sizes[1], sizes[3], sizes[3] + sizes[1] + sizes[0], 0],
                                  device=device)
    g = torch.randn(numel, generator=gen).to(device)
    g[::97] *= 1e-3
    g[5::1001] = float("nan")
    m0 = (torch.randn(numel, generator=gen) * 0.1).to(device)
    b0 = (m0.abs() + torch.rand(numel, generator=gen)).to(device)
    mask = (torch.rand(numel, generator=gen) < 0.9).to(device)
    for label, grad, kwargs in (("fp32", g, {}), ("bf16+mask", g.to(torch.bfloat16), {"mask_T": mask})):
        state = {}
        for name, fn in (("ref", ref.compress), ("kernel", kernels.compress)):
            m, b = m0.clone(), b0.clone()
            flag = torch.zeros(1, dtype=torch.uint8, device=device)
            bits = fn(grad, m, b, starts, canon, beta=0.9, seed=123, flag=flag, **kwargs)
            state[name] = (bits, m, b, flag)
        results[f"compress/{label}"] = all(_same(x, y) for x, y in zip(state["kernel"], state["ref"]))
    bits = ref.compress(g, m0.clone(), b0.clone(), starts, canon, beta=0.9, seed=123)
    prefix = min(CPU_PREFIX, numel // 8 * 8)  # a byte-aligned prefix: its bits are a prefix of the whole's
    for num_rows in ROW_COUNTS:
        counts = torch.randint(0, num_rows + 1, (numel,), generator=gen, dtype=torch.int32).to(device)
        rows = torch.stack([bits.roll(r) for r in range(num_rows)])
        mean = kernels.unpack_mean(rows, numel)
        cpu_mean = ref.unpack_mean(rows[:, : prefix // 8].cpu(), prefix)
        results[f"unpack_mean/n={num_rows}"] = _same(mean, ref.unpack_mean(rows, numel)) and _same(mean[:prefix],
                                                                                                   cpu_mean)
        results[f"counts_to_mean/n={num_rows}"] = _same(ref.counts_to_mean(counts, num_rows),
                                                        ref.counts_to_mean(counts.cpu(), num_rows))
        requantized = kernels.requantize(counts, num_rows, starts, canon, 0, seed=5)
        cpu_bits = ref.requantize(counts[:prefix].cpu(), num_rows, starts.cpu(), canon.cpu(), 0, seed=5)
        results[f"requantize/n={num_rows}"] = (_same(requantized, ref.requantize(counts, num_rows, starts, canon, 0, seed=5))
                                               and _same(requantized[: prefix // 8], cpu_bits))
        if num_rows in (2, 7, 12):
            results[f"unpack_counts/n={num_rows}"] = _same(kernels.unpack_counts(rows, numel),
                                                           ref.unpack_counts(rows, numel))
            planes = ref.pack_counts(counts, ref.count_bits(num_rows))
            results[f"pack_counts/n={num_rows}"] = _same(kernels.pack_counts(counts, ref.count_bits(num_rows)), planes)
            results[f"unpack_planes/n={num_rows}"] = _same(kernels.unpack_planes(planes, numel),
                                                           ref.unpack_planes(planes, numel))
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for planes_payload in (False, True):
                    payload = planes.unsqueeze(0) if planes_payload else rows
                    xs = [(torch.randn(n, generator=gen) * 4).to(device, dtype) for n in sizes]
                    ys = [x.clone() for x in xs]
                    kwargs = dict(planes=planes_payload, num_rows=num_rows,
                                  lr_P=torch.tensor([1e-3, 0.5, 0.01, 2.0], device=device),
                                  wd_P=torch.tensor([0.0, 0.1, 0.01, 0.5], device=device), mask_T=mask)
                    kernels.apply_packed_(xs, starts, canon, payload, **kwargs)
                    ref.apply_packed_(ys, starts, canon, payload, **kwargs)
                    key = f"apply_packed_/{str(dtype)[6:]}/{'planes' if planes_payload else 'rows'}/n={num_rows}"
                    results[key] = all(_same(x, y) for x, y in zip(xs, ys))
    x = torch.randn(numel, generator=gen).to(device, torch.bfloat16)
    results["apply_update_/bf16"] = _same(kernels.apply_update_(x.clone(), g.nan_to_num(), lr=0.3, weight_decay=0.1),
                                          ref.apply_update_(x.clone(), g.nan_to_num(), lr=0.3, weight_decay=0.1))
    _sync(device)
    failed = sorted(k for k, v in results.items() if v is not True)
    return {"numel": numel, "checks": len(results), "failed": failed, "all_equal": not failed, "results": results}


# -- hook -------------------------------------------------------------------------------------

def _mlp(width, depth):
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


class SyncCounter:
    """Counts CUDA host syncs (``set_sync_debug_mode("warn")`` warnings) by thread; 0 where none was seen."""

    def __init__(self, threads=("MainThread", "birder-comm")):
        self.by_thread = {name: 0 for name in threads}
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


def kernel_streams(events) -> dict:
    """From a Chrome trace's events: kernels per stream by kind, and whether the hook ran on its own stream.

    ``hook``: the hook's own Triton kernels, by name (:data:`HOOK_KERNELS`); ``step``: step()'s apply;
    ``gemm``: backward's and forward's matrix products; ``other``: the rest (ATen, NCCL).
    """
    by_stream = {}
    for event in events:
        if event.get("cat") != "kernel":
            continue
        name = event.get("name", "")
        stream = str(event.get("args", {}).get("stream", event.get("tid")))
        kind = ("hook" if any(k in name for k in HOOK_KERNELS) else "step" if any(k in name for k in STEP_KERNELS)
                else "gemm" if any(g in name.lower() for g in GEMM_NAMES) else "other")
        by_stream.setdefault(stream, {}).setdefault(kind, 0)
        by_stream[stream][kind] += 1
    hook = {s for s, kinds in by_stream.items() if kinds.get("hook")}
    gemm = {s for s, kinds in by_stream.items() if kinds.get("gemm")}
    step = {s for s, kinds in by_stream.items() if kinds.get("step")}
    return {"by_stream": by_stream, "hook_kernels": sum(k.get("hook", 0) for k in by_stream.values()),
            "hook_streams": sorted(hook), "step_streams": sorted(step),
            "hook_on_own_stream": len(hook) == 1 and not (hook & gemm),
            "step_on_gemm_stream": bool(step) and step <= gemm}


def _train(device, method, width, depth, steps, trace_dir=None, dtype=torch.float32):
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from dist_supernet import Birder

    _launch = None
    if kernels.triton_available():
        from dist_supernet.kernels.ops import _launch
    torch.manual_seed(0)
    model = _mlp(width, depth).to(device, dtype)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    _sync(device)
    start = time.perf_counter()
    with (_launch.record() if _launch is not None else contextlib.nullcontext([])) as launches:
        if method == "fp32":
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        else:
            opt = Birder(ddp, lr=1e-3, collective="two_phase")
        _sync(device)
        warmup_s = time.perf_counter() - start
        attached = len(launches)
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(256, width, generator=gen).to(device, dtype)
        y = torch.randint(0, 10, (256,), generator=gen).to(device)
        times, syncs, step_marks = [], None, []
        for step in range(steps):
            step_marks.append(len(launches))
            _sync(device)
            start = time.perf_counter()
            counting = device.type == "cuda" and step == steps - 2
            if counting:
                torch.cuda.set_sync_debug_mode("warn")
            with (SyncCounter() if counting else _Null()) as in_backward:
                F.cross_entropy(ddp(x).float(), y).backward()
            with (SyncCounter() if counting else _Null()) as in_step:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if counting:
                torch.cuda.set_sync_debug_mode("default")
                syncs = {"backward": in_backward.by_thread, "step": in_step.by_thread}
            _sync(device)
            times.append(time.perf_counter() - start)
        trained = launches[attached:]
        from_step3 = launches[step_marks[2]:] if len(step_marks) > 2 else []
    flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])
    streams = None
    if trace_dir is not None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(2):
                F.cross_entropy(ddp(x).float(), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            _sync(device)
        path = Path(trace_dir) / f"trace_{method}.json"
        prof.export_chrome_trace(str(path))
        streams = kernel_streams(json.loads(path.read_text()).get("traceEvents", []))
    keys = {
        "warmed": sorted({str(e.key) for e in launches[:attached]}),
        "trained": sorted({str(e.key) for e in trained if not e.tuning}),
        "tuned_in_step": sorted({str(e.key) for e in trained if e.tuning}),
        # launches from step 3 on that ran a default config for want of tuning (0 when the warm-up and
        # step 2's tune_missed covered every key)
        "untuned_from_step3": sum(1 for e in from_step3 if not e.tuning and e.key not in _launch.tuned_keys()
                                  and _launch.autotune_enabled()),
        "tuning_threads": sorted({e.thread for e in launches if e.tuning}),
    } if _launch is not None and kernels.backend_for(torch.empty(0, device=device)) == "triton" else None
    return {"step_s": times, "syncs": syncs, "streams": streams, "params": flat, "warmup_s": warmup_s, "keys": keys}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_hook(device, small, trace_dir) -> dict:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29701")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, **({"device_id": device} if device.type == "cuda" else {}))
    width, depth, steps = (256, 2, 12) if small else (2896, 6, 12)  # 6 x 2896^2 ~ 50M parameters
    try:
        birder = _train(device, "birder", width, depth, steps, trace_dir=trace_dir)
        fp32 = _train(device, "fp32", width, depth, steps)
        previous = kernels.get_backend()
        kernels.set_backend("torch")
        try:
            torch_path = _train(device, "birder", width, depth, steps)
        finally:
            kernels.set_backend(previous)
        bf16 = _train(device, "birder", width, depth, 4, dtype=torch.bfloat16)
        kernels.set_backend("torch")
        try:
            bf16_torch = _train(device, "birder", width, depth, 4, dtype=torch.bfloat16)
        finally:
            kernels.set_backend(previous)
    finally:
        dist.destroy_process_group()
    med = lambda ts: statistics.median(ts[2:])  # noqa: E731
    syncs = birder["syncs"] or {}
    return {
        "num_params": sum(p.numel() for p in _mlp(width, depth).parameters()),
        "steps": steps,
        "params_equal_torch_path": bool(torch.equal(birder["params"], torch_path["params"])),
        "bf16_params_equal_torch_path": bool(torch.equal(bf16["params"], bf16_torch["params"])),
        "warmup_s": birder["warmup_s"],
        "keys": birder["keys"],
        "host_syncs": syncs,
        "host_syncs_in_hook": syncs.get("backward", {}).get("birder-comm", 0) if syncs else None,
        "host_syncs_in_step": syncs.get("step", {}).get("MainThread", 0) if syncs else None,
        "streams": birder["streams"],
        "step1_s": birder["step_s"][0], "step10_s": birder["step_s"][min(9, steps - 1)],
        "birder_median_s": med(birder["step_s"]), "fp32_median_s": med(fp32["step_s"]),
        "torch_path_median_s": med(torch_path["step_s"]),
        "birder_vs_fp32": med(birder["step_s"]) / med(fp32["step_s"]),
    }


# -- collectives ------------------------------------------------------------------------------

def collective_variants(world_size: int) -> list:
    """(name, Birder kwargs) for ``world_size`` ranks: every registered collective, node groups where it builds
    them (2 nodes), and the option forms with their own code paths."""
    from dist_supernet.comm.collectives import COLLECTIVES

    variants = [(name, {"collective": name, **({"num_nodes": 2} if cls.needs_node_groups else {})})
                for name, cls in COLLECTIVES.items()]
    if "two_phase" in COLLECTIVES:
        variants.append(("two_phase+requantize", {"collective": "two_phase", "requantize": True}))
    if "hierarchical" in COLLECTIVES:
        variants.append(("hierarchical+reduce_scatter", {"collective": "hierarchical", "num_nodes": 2,
                                                         "inter_node": "reduce_scatter"}))
    return variants


def _exchange(params, kwargs, grads, steps, mask=None):
    """``steps`` exchanges of a compressor over ``params`` (one chunk of all): packed payloads, m, b, flags, x."""
    from dist_supernet.optim.compressor import BirderCompressor

    comp = BirderCompressor(params, beta=0.9, seed=3)
    comp.connect(kwargs["collective"], requantize=kwargs.get("requantize", False), num_nodes=kwargs.get("num_nodes"),
                 inter_node=kwargs.get("inter_node", "auto"))
    chunk = comp.chunk(params)
    device = params[0].device
    out = []
    lr, wd = torch.full((len(params),), 0.01, device=device), torch.full((len(params),), 0.1, device=device)
    for step in range(steps):
        flag = torch.zeros(1, dtype=torch.uint8, device=device)
        packed = comp.exchange(grads[step].to(device), chunk, flag=flag, mask_T=mask)
        kernels.apply_packed_(chunk.param_views(), chunk.seg_starts, chunk.seg_canon, packed.payload,
                              planes=packed.planes, num_rows=packed.num_rows, lr_P=lr, wd_P=wd, mask_T=mask)
        out.append({"payload": packed.payload.cpu(), "planes": packed.planes, "num_rows": packed.num_rows,
                    "flag": flag.cpu()})
        comp.step += 1
    out.append({"m": comp.m.cpu(), "b": comp.b.cpu(), "x": torch.cat([p.detach().reshape(-1).cpu() for p in params])})
    comp.collective, comp.groups = None, None
    return out


def _collectives_worker(rank, world_size, device_type, port, out):
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from dist_supernet import Birder

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    common.init_loopback_gloo(rank, world_size, port)
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    results = {}
    numels = [100003, 77, 4099, 1]
    gen = torch.Generator().manual_seed(100 + rank)
    grads = [torch.randn(sum(numels), generator=gen) for _ in range(3)]
    grads[1][::501] = float("inf")  # a non-finite step: flagged, never enters m, b
    mask = torch.Generator().manual_seed(9)
    mask = torch.rand(sum(numels), generator=mask) < 0.8
    for name, kwargs in collective_variants(world_size):
        try:
            x0 = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in numels]
            fast = _exchange([x.clone().to(device) for x in x0], kwargs, grads, 3, mask.to(device))
            previous = kernels.get_backend()
            kernels.set_backend("torch")
            try:
                slow = _exchange([x.clone() for x in x0], kwargs, grads, 3, mask)
            finally:
                kernels.set_backend(previous)
            same = all(_same(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                       for a, b in zip(fast, slow) for k in a)
            digest = torch.cat([fast[-1]["x"], fast[0]["payload"].float().reshape(-1)])
            rows = [torch.empty_like(digest) for _ in range(world_size)]
            dist.all_gather(rows, digest)
            results[name] = {"equal_to_cpu_reference": same,
                             "x_equal_across_ranks": all(torch.equal(rows[0], r) for r in rows),
                             "num_rows": fast[0]["num_rows"], "planes": fast[0]["planes"]}
        except Exception as error:  # reported per collective: gloo's CUDA support differs by collective
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    for name, kwargs in collective_variants(world_size)[:2] + collective_variants(world_size)[-1:]:
        try:
            torch.manual_seed(0)
            model = _mlp(128, 2).to(device)
            ddp = DistributedDataParallel(model, bucket_cap_mb=0.05)
            opt = Birder(ddp, lr=1e-2, **kwargs)
            for _ in range(4):
                x = torch.randn(32, 128, generator=gen).to(device)
                y = torch.randint(0, 10, (32,), generator=gen).to(device)
                F.cross_entropy(ddp(x), y).backward()
                opt.step()
                opt.zero_grad()
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
            rows = [torch.empty_like(flat) for _ in range(world_size)]
            dist.all_gather(rows, flat)
            results[f"ddp/{name}"] = {"replicas_equal": all(torch.equal(rows[0], r) for r in rows)}
            opt.hook_state.close()
        except Exception as error:  # reported per collective
            results[f"ddp/{name}"] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def check_collectives(device, small) -> dict:
    result = {}
    for world_size, port in ((2, 29711),) + (() if small else ((4, 29721),)):
        ranks = common.spawn_gloo(_collectives_worker, world_size, device.type, port)
        result[f"world_{world_size}"] = ranks
    ok = all(isinstance(v, dict) and v.get("equal_to_cpu_reference", v.get("replicas_equal")) is True
             and v.get("x_equal_across_ranks", True) is True
             for world in result.values() for v in world.values())
    result["all_equal"] = ok
    result["note"] = ("processes share one GPU over gloo with CUDA tensors (NCCL refuses two ranks on one GPU): "
                      "multi-rank NCCL is not checked here")
    return result


# -- app --------------------------------------------------------------------------------------

def check_app(device, small) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        steps = 6 if small else 30
        cmd = [sys.executable, "-m", "dist_supernet.train", "model=mlp", f"trainer.max_steps={steps}",
               "trainer.log_every=3", f"trainer.eval_every={steps}", f"trainer.device={device.type}",
               f"hydra.run.dir={run_dir}"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
        summary = run_dir / "summary.json"
        result = {"returncode": proc.returncode, "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}
        if summary.is_file():
            data = json.loads(summary.read_text())
            result.update({k: data.get(k) for k in ("steps", "world_size", "compression", "collective",
                                                    "final_loss", "eval_accuracy", "params_in_sync")})
        return result


# -- main -------------------------------------------------------------------------------------

def run_part(part, device, small, out_dir) -> dict:
    if part == "env":
        return check_env(device)
    if part == "kernels":
        return check_kernels(device, 4097 * 3 if small else 2**24 + 3)
    if part == "hook":
        return check_hook(device, small, out_dir)
    if part == "collectives":
        return check_collectives(device, small)
    if part == "app":
        return check_app(device, small)
    raise ValueError(f"--part={part!r}: expected one of {', '.join(PARTS)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--part", action="append", choices=PARTS, help="a part to run (repeatable; default: all)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="small sizes (the CPU test of this script)")
    parser.add_argument("--trace-dir", type=Path, help="where the hook's profiler trace goes (default: OUT_DIR)")
    parser.add_argument("--record-failure", nargs=2, metavar=("PART", "MESSAGE"),
                        help="only write MESSAGE as PART's error (gpu_check.sh, after a timeout)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.record_failure:
        part, message = args.record_failure
        return merge_result(args.out_dir, part, {"error": message})
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch.cuda.is_available() is False: nothing checked (no silent CPU run)", flush=True)
        sys.exit(2)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    report = {}
    for part in args.part or PARTS:
        start = time.perf_counter()
        try:
            result = run_part(part, device, args.small, args.trace_dir or args.out_dir)
        except Exception as error:  # a failed part is reported, the others still run
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        report = merge_result(args.out_dir, part, result, time.perf_counter() - start)
        print(part, json.dumps(result, default=str)[:3000], flush=True)
    print(f"wrote {args.out_dir / RESULTS}")
    return report


if __name__ == "__main__":
    main()
