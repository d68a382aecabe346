"""One process of the step-time benchmarks: train a few steps with each compression, print JSON.

Launched by torchrun (``benchmarks/slow_link.py`` and ``benchmarks/hierarchical_scale.py``
do it; see ``benchmarks/README.md``). Every method runs in the same process
group on its own copy of the same model:

- ``compute``: DDP fp32 under ``no_sync()`` (forward, backward, SGD step, no
  communication): the compute time of a step;
- ``fp32``: DDP's own fp32 all-reduce (the project's ``none`` baseline hook,
  which counts bytes around torch's ``allreduce_hook``);
- ``fp16``: torch's ``fp16_compress_hook``;
- ``powersgd``: torch's PowerSGD hook, rank ``--powersgd-rank`` (on gloo the
  project's wrapper finishes each bucket before the next: no overlap);
- ``allgather`` / ``two_phase`` / ``hierarchical``: Birder with that 1-bit collective.

The methods are read from the registries (``dist_supernet.comm.BASELINES``,
the baselines that run on gloo, and ``COLLECTIVES``); ``--plugins`` imports
modules that register more first, and they are then methods too.

The baselines step with ``torch.optim.SGD`` (momentum 0.9, foreach), which costs
about what Birder's own update costs (one pass over x), so step times compare
the communication, not the optimizers.

Every method is built and warmed up first; the timed steps then go
round-robin, one step of each method per round, so that the load of other
users of a shared machine falls on every method alike. A step is: barrier on
every rank, then forward, backward (DDP's comm hook runs inside it and
backward returns only once every bucket is reduced), optimizer step. Its
time is the slowest rank's. Reported per method: median step time,
bytes this rank put on the wire per step by the project's accounting
(``CommStats``: intra- and inter-node), and, when ``BENCH_IFACE`` names an
interface of this network namespace, the bytes its counters saw per step
(``/proc/net/dev``, read by local rank 0 of every node; they include TCP/IP
headers, ACKs and the barriers).

Rank 0 prints one line ``BENCH_RESULT {json}`` and writes it to ``--out``.

``--profile`` adds, for every method, ``--profile-steps`` more (untimed) steps
that say where a step's time goes on each rank:
forward / backward / optimizer phases of the training loop, and (Birder) the
wall time of every kernel call, of each collective stage (a gloo call: its
time includes waiting for the peer) and of the hook's whole exchange, all
measured by wrapping those functions in this process (dist_supernet is not
changed); plus torch.profiler's top operators by self CPU time.

Example::
    torchrun --standalone --nproc_per_node=2 benchmarks/step_worker.py --model mlp \
        --methods compute,fp32,allgather --steps 5 --out /tmp/result.json
    python benchmarks/step_worker.py --plugins my_package.my_collective --help   # lists its methods
"""

import argparse
import collections
import contextlib
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from dist_supernet import kernels  # noqa: E402
from dist_supernet.comm import BASELINES, COLLECTIVES, Topology, register_baseline_hook  # noqa: E402
from dist_supernet.comm.collectives import OneBitCollective  # noqa: E402
from dist_supernet.plugins import load_plugins  # noqa: E402
from dist_supernet.optim.engine import ExchangeEngine  # noqa: E402
from dist_supernet.models.cnn import CNN  # noqa: E402
from dist_supernet.models.mlp import MLP  # noqa: E402
from dist_supernet.optim import Birder  # noqa: E402

# The benchmarks' name for a baseline where it differs: DDP's own all-reduce (``none``) is "fp32".
BASELINE_ALIASES = {"none": "fp32"}
# Birder with a forced inter-node form of hierarchical (auto picks allgather at 2 nodes).
FORMS = {"hierarchical_rs": ("hierarchical", "reduce_scatter")}
# FSDP2, sharded over each node's ranks (dist_supernet.train.parallel): every node alone, no exchange
# across nodes (the compute and intra-node part of an HSDP step); FSDP's native fp32 HSDP; Birder's 1-bit HSDP.
HSDP_METHODS = ("hsdp_local", "hsdp_fp32", "hsdp_birder")


def baseline_methods() -> dict[str, str]:
    """method -> baseline name, for every registered baseline that runs on gloo (this worker's backend)."""
    return {BASELINE_ALIASES.get(name, name): name for name, baseline in BASELINES.items()
            if "gloo" in baseline.backends}


def method_names(*, forms: bool = True, hsdp: bool = True) -> tuple[str, ...]:
    """Every method, in run order: compute, the baselines, the registered 1-bit collectives (, the forced
    forms, the FSDP2 methods)."""
    return ("compute", *baseline_methods(), *COLLECTIVES, *(FORMS if forms else ()), *(HSDP_METHODS if hsdp else ()))


def load_plugin_arg(argv=None) -> str:
    """Import ``--plugins`` (comma-separated modules) before the method list is built; returns its value."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugins", default="")
    known, _ = pre.parse_known_args(argv)
    try:
        load_plugins(known.plugins)
    except ValueError as error:  # ConfigError: plugins=[...]: cannot import ...
        pre.error(f"--{error}")
    return known.plugins
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10

# name -> (builder, batch size). Batch sizes: the MLP's compute is small next to its
# 10.5M-parameter gradient (the communication-bound case, ~45 ms fwd+bwd on one core
# of this Xeon); the CNN's is ~6x larger per step for 15.7M parameters (~0.28 s).
MODELS = {
    "mlp": (lambda: MLP(3 * 32 * 32, [2048, 2048], NUM_CLASSES), 64),
    "cnn": (lambda: CNN(3, 32, [64, 128, 256, 512, 1024, 1024], NUM_CLASSES), 32),
    # --quick: small enough that a smoke run takes seconds
    "tiny": (lambda: MLP(3 * 32 * 32, [256], NUM_CLASSES), 32),
    # A character-level transformer (dist_supernet.models.gpt): 6 layers x 8 heads x 256, tied head, 4.8M
    # parameters; a batch is 8 windows of 128 tokens (batches of random tokens: step time, not learning).
    "gpt": (lambda: _gpt(), 8),
}
GPT_VOCAB, GPT_BLOCK = 96, 128
TEXT_MODELS = {"gpt": (GPT_VOCAB, GPT_BLOCK)}  # name -> (vocabulary, tokens per window)


def _gpt():
    from dist_supernet.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=GPT_VOCAB, block_size=GPT_BLOCK, n_layer=6, n_head=8, n_embd=256))


def read_iface_bytes(iface: str | None) -> dict | None:
    """{'rx', 'tx', 'tx_packets'} counters of ``iface`` in this network namespace, or None."""
    if not iface:
        return None
    with open("/proc/net/dev") as counters:
        for line in counters:
            name, _, rest = line.partition(":")
            if name.strip() == iface:
                fields = rest.split()
                return {"rx": int(fields[0]), "tx": int(fields[8]), "tx_packets": int(fields[9])}
    return None


class StageTimer:
    """Wall seconds per named stage, summed over threads: the --profile instrumentation."""

    # kernels.<name> (what dist_supernet calls) and kernels.reference.<name> (inside
    # the torch path's compress / unpack: the hash, the bit packing).
    KERNELS = ("compress", "unpack_counts", "pack_counts", "unpack_planes", "requantize", "apply_packed_")
    REFERENCE_PARTS = ("uniform", "pack_bits", "unpack_bits")

    def __init__(self):
        self._lock = threading.Lock()
        self.seconds = collections.defaultdict(float)
        self.calls = collections.Counter()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    @contextlib.contextmanager
    def span(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.span(name):
                return fn(*args, **kwargs)

        return timed

    def install(self) -> None:
        """Wrap the kernels, collective stages and hook exchange of this process."""
        for name in self.KERNELS:
            setattr(kernels, name, self.wrap(f"kernel {name}", getattr(kernels, name)))
        for name in self.REFERENCE_PARTS:
            setattr(kernels.reference, name, self.wrap(f"  torch path: {name}", getattr(kernels.reference, name)))
        stage = OneBitCollective.stage

        def timed_stage(collective, name, where, fn):
            with self.span(f"gloo {name} ({where})"):
                return stage(collective, name, where, fn)

        OneBitCollective.stage = timed_stage
        ExchangeEngine.compress_pieces = self.wrap("hook compress (per bucket, compress thread)",
                                                   ExchangeEngine.compress_pieces)
        ExchangeEngine.reduce_piece = self.wrap("hook reduce (per piece, comm thread)", ExchangeEngine.reduce_piece)

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.calls.clear()

    def per_step(self, steps: int) -> dict:
        with self._lock:
            return {name: {"ms": 1e3 * s / steps, "calls": self.calls[name] / steps}
                    for name, s in sorted(self.seconds.items(), key=lambda item: -item[1])}


TIMER = None  # a StageTimer with --profile


class _CountedFSDP:
    """An FSDP2 model as the timing loop calls it; each step adds FSDP's own traffic (train.parallel's model)."""

    def __init__(self, parallel, stats, topology):
        self.parallel, self.stats, self.topology = parallel, stats, topology

    def __call__(self, x):
        self.stats.add(self.parallel.step_bytes(self.topology, passes=1), exchanges=0)
        return self.parallel.module(x)

    def no_sync(self):
        return self.parallel.no_sync()


def build_hsdp(method: str, model, args):
    """``model`` sharded with FSDP2 over each node's ranks, its optimizer and byte counter (see HSDP_METHODS)."""
    from dist_supernet.comm import CommStats
    from dist_supernet.train.parallel import Parallel

    parallel = Parallel.wrap(model, "hsdp", device=torch.device("cpu"), num_nodes=args.num_nodes,
                             native=method == "hsdp_fp32")
    if method == "hsdp_birder":
        opt = Birder(model.parameters(), lr=1e-3)
        opt.attach(model, mesh=parallel.mesh)
        stats = opt.comm_stats
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
        stats = CommStats()
    return _CountedFSDP(parallel, stats, Topology.from_env(args.num_nodes)), opt, stats


def build(method: str, model_name: str, args):
    """A fresh model, its DDP wrapper, the optimizer and the byte counter for ``method``."""
    torch.manual_seed(0)  # the same initial weights for every method and rank
    builder, _ = MODELS[model_name]
    model = builder()
    if method in HSDP_METHODS:
        return build_hsdp(method, model, args)
    ddp_model = DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
    if method in COLLECTIVES or method in FORMS:
        collective, inter_node = FORMS.get(method, (method, "auto"))
        opt = Birder(ddp_model, lr=1e-3, collective=collective, inter_node=inter_node, num_nodes=args.num_nodes)
        return ddp_model, opt, opt.comm_stats
    name = baseline_methods().get(method, "none")  # "compute" never communicates; a hook is harmless
    options = {"rank": args.powersgd_rank} if name == "powersgd" else {}
    stats = register_baseline_hook(ddp_model, name, topology=Topology.from_env(args.num_nodes), **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    return ddp_model, opt, stats


def train_step(ddp_model, opt, batch, *, sync: bool):
    x, y = batch
    span = TIMER.span if TIMER is not None else (lambda name: contextlib.nullcontext())
    opt.zero_grad(set_to_none=True)
    with contextlib.nullcontext() if sync else ddp_model.no_sync():
        with span("step: forward"):
            logits = ddp_model(x)  # [B, classes], or [B, T, vocab] for a text model
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        with span("step: backward (waits for every bucket's reduction)"):
            loss.backward()
    with span("step: optimizer"):
        opt.step()


def top_ops(profiler, steps: int, limit: int = 15) -> list[dict]:
    """torch.profiler's operators with the most self CPU time, per step (all threads)."""
    events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:limit]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps}
            for e in events]


class MethodRun:
    """One method's model, optimizer and byte counter, and what its timed steps measured."""

    def __init__(self, method: str, args):
        self.method = method
        self.ddp_model, self.opt, self.stats = build(method, args.model, args)
        self.sync = method != "compute"
        self.times = []
        self.bytes = collections.Counter()
        self.iface = collections.Counter() if args.iface and args.is_node_leader else None
        self.profile = None
        self.piece_log2 = []  # Birder: the agreed CPU piece size after each timed step (log2 elements)

    def step(self, batch):
        train_step(self.ddp_model, self.opt, batch, sync=self.sync)


def run_methods(methods: list[str], args, batch, timing_group) -> list[dict]:
    """Warm up every method, then time them round-robin: one step of each per round.

    Interleaving puts the load of other users of a shared machine (it drifts by 2x
    within minutes on this 2-core box) on every method alike, so the ratios hold
    even when the absolute times move.
    """
    runs = [MethodRun(method, args) for method in methods]
    for run in runs:
        for _ in range(args.warmup):  # DDP rebuilds its buckets after step 1; PowerSGD compresses from step 3
            run.step(batch)
    for _ in range(args.steps):
        for run in runs:
            dist.barrier(group=timing_group)
            stats_before = run.stats.snapshot()
            iface_before = read_iface_bytes(args.iface) if run.iface is not None else None
            start = time.perf_counter()
            run.step(batch)
            run.times.append(time.perf_counter() - start)
            dist.barrier(group=timing_group)  # the peers' traffic of this step has been sent
            if iface_before is not None:
                run.iface.update({k: v - iface_before[k] for k, v in read_iface_bytes(args.iface).items()})
            run.bytes.update({k: v - stats_before[k] for k, v in run.stats.snapshot().items()})
            if isinstance(run.opt, Birder):
                run.piece_log2.append(run.opt.hook_state.piece_log2)
    if TIMER is not None:
        for run in runs:  # separate profiled steps, after the timed ones
            run.profile = profile_steps(run, args, batch, timing_group)

    results = []
    for run in runs:
        mine = {
            "rank": dist.get_rank(),
            "node": int(os.environ.get("GROUP_RANK", 0)),
            "times": run.times,
            "bytes": {k: run.bytes[k] / args.steps for k in ("bytes_intra", "bytes_inter", "bytes_total")},
            "iface": None if run.iface is None else {k: v / args.steps for k, v in run.iface.items()},
            "profile": run.profile,
            "piece_log2": run.piece_log2,
        }
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine, group=timing_group)
        step_times = [max(r["times"][i] for r in per_rank) for i in range(args.steps)]
        results.append({
            "method": run.method,
            "median_s": common.median_range(step_times)[0],
            "step_times_s": step_times,
            "ranks": per_rank,
        })
    return results


def profile_steps(run: MethodRun, args, batch, timing_group) -> dict:
    """Per-stage wall time and torch.profiler's top ops over ``--profile-steps`` extra steps."""
    TIMER.reset()
    # profile_all_threads: Birder's compression runs on its communication thread.
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True),
    )
    with profiler:
        for _ in range(args.profile_steps):
            dist.barrier(group=timing_group)
            with TIMER.span("step (profiled, instrumented)"):
                run.step(batch)
        dist.barrier(group=timing_group)
    return {"stages": TIMER.per_step(args.profile_steps), "ops": top_ops(profiler, args.profile_steps)}


def main(argv=None):
    plugins = load_plugin_arg(argv)
    all_methods = method_names()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", default=plugins,
                        help="comma-separated modules to import first: the collectives and baselines they "
                             "register become methods (see dist_supernet/plugins.py)")
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--methods", default=",".join(all_methods),
                        help=f"comma-separated, from {', '.join(all_methods)}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 2 for PowerSGD)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size (its default)")
    parser.add_argument("--powersgd-rank", type=int, default=4)
    parser.add_argument("--num-nodes", type=int, default=None,
                        help="node count for Birder and the byte accounting (None: torchrun's LOCAL_WORLD_SIZE)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed steps, --profile-steps more per method with per-stage "
                             "wall times and torch.profiler's top ops")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="rank 0 writes its JSON here too")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if method not in all_methods:
            raise ValueError(f"--methods: {method!r} is not one of {', '.join(all_methods)}")
    if "powersgd" in methods and args.warmup < 2:
        raise ValueError(f"--warmup={args.warmup}: PowerSGD compresses from its third step, use >= 2")

    torch.set_num_threads(args.threads)
    if args.profile:
        global TIMER
        TIMER = StageTimer()
        TIMER.install()
    dist.init_process_group("gloo")
    args.iface = os.environ.get("BENCH_IFACE")
    args.is_node_leader = int(os.environ.get("LOCAL_RANK", 0)) == 0
    timing_group = dist.new_group(backend="gloo")  # barriers and result gathering, apart from DDP's
    _, batch_size = MODELS[args.model]
    generator = torch.Generator().manual_seed(1 + dist.get_rank())
    if args.model in TEXT_MODELS:
        vocab, block = TEXT_MODELS[args.model]
        tokens = torch.randint(0, vocab, (batch_size, block + 1), generator=generator)
        batch = (tokens[:, :-1], tokens[:, 1:])
    else:
        batch = (torch.randn(batch_size, *IMAGE_SHAPE, generator=generator),
                 torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator))

    results = run_methods(methods, args, batch, timing_group)
    if dist.get_rank() == 0:
        builder, _ = MODELS[args.model]
        report = {
            "model": args.model,
            "num_params": sum(p.numel() for p in builder().parameters()),
            "batch_per_rank": batch_size,
            "world_size": dist.get_world_size(),
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
            "threads": args.threads,
            "warmup": args.warmup,
            "steps": args.steps,
            "schedule": "round-robin: one timed step of each method per round",
            "iface": args.iface,
            "profile": args.profile,
            "torch": torch.__version__,
            "results": results,
        }
        line = json.dumps(report)
        print("BENCH_RESULT " + line, flush=True)
        if args.out:
            Path(args.out).write_text(line)
    dist.barrier(group=timing_group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
