"""One process of the time-to-accuracy benchmark: several training runs of the app, round-robin, one JSON.

Launched by torchrun (``benchmarks/time_to_accuracy.py`` does it, across two network
namespaces or on one node). Every method is a :class:`dist_supernet.train.trainer.Trainer`
built from the app's own config (``conf/train.yaml`` + the method's overrides: model,
data, compression, optimizer, lr schedule), all in one process group; the worker calls
each trainer's own ``train_step`` (the step ``torchrun -m dist_supernet.train`` runs),
one step of each method per round, so that the load of other users of a shared
machine falls on every method alike. A step is timed from a barrier to its end
(forward, backward with the comm hook, optimizer); its time is the slowest rank's.
Every ``--eval-every`` steps (and at ``--eval-steps``) each method's val loss is scored
on the data's fixed val windows (untimed: the clock is training time only).

``compute`` is a timing-only method: DDP fp32 + AdamW with the gradient exchange
switched off (DDP's ``require_backward_grad_sync = False`` for the whole run, as
``no_sync()`` sets it per step), i.e. the compute of a step; its losses are one
rank's and are not reported.

Rank 0 prints ``BENCH_RESULT {json}`` and writes the JSON to ``--out``.

Example::
    torchrun --standalone --nproc_per_node=2 benchmarks/time_to_accuracy_worker.py --steps 20 \\
        --method fp32_adamw="compression=none optim=adamw" --method birder="compression=birder optim=birder" \\
        --base "experiment=gpt_small" --out /tmp/tta.json
"""

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dist_supernet.train import distributed  # noqa: E402
from dist_supernet.train.config import register_resolvers  # noqa: E402
from dist_supernet.train.trainer import Trainer  # noqa: E402
from step_worker import read_iface_bytes  # noqa: E402  (this folder is sys.path[0] for a script)

COMPUTE = "compute"


def compose_train(*overrides: str):
    """``conf/train.yaml`` with ``overrides``: the config ``torchrun -m dist_supernet.train <overrides>`` runs."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


class MethodRun:
    """One method: its trainer, and what its steps and evaluations measured on this rank."""

    def __init__(self, name: str, overrides: list[str], root: Path):
        self.name, self.overrides = name, overrides
        self.trainer = Trainer(compose_train(*overrides), output_dir=root / name)
        if name == COMPUTE:  # every backward as under no_sync(): no exchange, the compute of a step
            self.trainer.ddp_model.require_backward_grad_sync = False
        self.times: list[float] = []
        self.evals: list[dict] = []
        self.iface_bytes = {"tx": 0, "rx": 0, "tx_packets": 0}

    def evaluate(self) -> None:
        metrics = self.trainer.evaluate()
        self.evals.append({"step": self.trainer.step, "val_loss": metrics["loss"]})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="a method: its name and its app overrides (one quoted string); repeat")
    parser.add_argument("--base", default="", help="overrides every method gets first (model, data, batch)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-steps", default="", help="comma-separated extra steps to evaluate at")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    wire = bool(os.environ.get("BENCH_IFACE"))  # the same on every rank: every rank takes the barriers below
    iface = os.environ.get("BENCH_IFACE") if int(os.environ.get("LOCAL_RANK", 0)) == 0 else None
    timing_group = dist.new_group(backend="gloo")  # barriers and results, apart from the trainers' collectives
    eval_at = {args.steps} | {s for s in range(0, args.steps + 1, args.eval_every)} | {
        int(s) for s in args.eval_steps.split(",") if s}
    common = [f"trainer.max_steps={args.steps}", f"trainer.seed={args.seed}", "trainer.resume=never",
              "trainer.eval_every=0", "trainer.checkpoint_every=0", f"trainer.timeout_s={args.timeout_s}"]
    methods = []
    with tempfile.TemporaryDirectory() as tmp:
        run_root = Path(distributed.broadcast_object(tmp if rank == 0 else None))  # one dir, as the app has
        for spec in args.method:
            name, _, overrides = spec.partition("=")
            methods.append(MethodRun(name, [*shlex.split(args.base), *common, *shlex.split(overrides)], run_root))
        for run in methods:
            run.evaluate()  # step 0: every method starts from the same weights (trainer.seed)
        for step in range(1, args.steps + 1):
            for run in methods:
                dist.barrier(group=timing_group)
                before = read_iface_bytes(iface)
                start = time.perf_counter()
                run.trainer.train_step()
                run.times.append(time.perf_counter() - start)
                run.trainer.step += 1
                if wire:
                    dist.barrier(group=timing_group)  # the peers' traffic of this step has been sent
                if before is not None:  # one process per node reads its veth's counters
                    after = read_iface_bytes(iface)
                    for key in run.iface_bytes:
                        run.iface_bytes[key] += after[key] - before[key]
            if step in eval_at:
                for run in methods:
                    run.evaluate()
                if rank == 0:  # progress, in the launcher's log
                    print(f"step {step}: " + ", ".join(f"{r.name} {r.evals[-1]['val_loss']:.4f} "
                                                       f"({sum(r.times):.0f} s)" for r in methods), flush=True)

        results = []
        for run in methods:
            trainer = run.trainer
            snapshot = trainer.comm_stats.snapshot()
            # DDP: every rank's whole model; HSDP: each shard against its twins on the other nodes
            in_sync, _ = trainer.parallel.replicas_in_sync()
            mine = {"times": run.times, "bytes": snapshot, "iface": run.iface_bytes if iface else None,
                    "in_sync": in_sync}
            per_rank = [None] * world_size
            dist.all_gather_object(per_rank, mine, group=timing_group)
            collective = trainer.optimizer.hook_state.collective.name if trainer.cfg.compression.name == "birder" \
                else trainer.cfg.compression.collective
            results.append({
                "method": run.name,
                "overrides": run.overrides,
                "compression": trainer.cfg.compression.name,
                "collective": collective,
                "optimizer": trainer.cfg.optim.name,
                "lr": trainer.cfg.optim.lr,
                "step_times_s": [max(r["times"][i] for r in per_rank) for i in range(args.steps)],
                "evals": run.evals if run.name != COMPUTE else [],
                "bytes_per_step_per_rank": sum(r["bytes"]["bytes_total"] for r in per_rank) / world_size / args.steps,
                "inter_node_bytes_per_step_per_rank": sum(r["bytes"]["bytes_inter"] for r in per_rank)
                / world_size / args.steps,
                "wire_tx_bytes_per_step_per_node": (
                    sum(r["iface"]["tx"] for r in per_rank if r["iface"]) / max(1, sum(bool(r["iface"]) for r in per_rank))
                    / args.steps if any(r["iface"] for r in per_rank) else None),
                "params_in_sync": all(r["in_sync"] for r in per_rank),
                "parallelism": trainer.parallel.kind,
                # DDP's buckets after its rebuild at step 1 (bytes): PowerSGD's gloo ordering needs >= 2 to matter
                "ddp_bucket_bytes": str(trainer.ddp_model._get_ddp_logging_data().get("bucket_sizes", ""))
                if trainer.parallel.kind == "ddp" else None,
                "num_params": sum(p.numel() for p in trainer.model.parameters()),
            })
        if rank == 0:
            first = methods[0].trainer
            report = {
                "world_size": world_size,
                "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
                "num_nodes": first.topology.num_nodes,
                "steps": args.steps,
                "seed": args.seed,
                "eval_steps": sorted(eval_at),
                "base": args.base,
                "batch_per_rank": first.cfg.trainer.batch_size,
                "block_size": first.model.block_size,
                "data_sha256": first.data.sha256,
                "eval_windows": first.data.eval_windows,
                "iface": os.environ.get("BENCH_IFACE"),
                "threads": args.threads,
                "torch": torch.__version__,
                "results": results,
            }
            line = json.dumps(report)
            print("BENCH_RESULT " + line, flush=True)
            if args.out:
                Path(args.out).write_text(line)
        dist.barrier(group=timing_group)
    # The trainers' process groups, hook threads and gloo workers: the app ends the same way (no finalization,
    # where gloo's teardown can hang; see dist_supernet/train/__main__.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
