"""The training loop: setup in ``Trainer.__init__``, the loop in ``Trainer.fit``, top to bottom.

Per step, on every rank (``Trainer.train_step``, the only step): the step's
:class:`StepPlan` (``plan_step``: a plain model is one pass, a supernet's
sampler makes one pass per sampled subnet), then ``grad_accum`` micro-batches
that the data module hands out (``data.train_batches``: this rank's shard of
images, or its windows of text), each through every pass of the plan. Every backward but
the step's last runs under ``ddp.no_sync()``, so the gradient is reduced once:
the compression hook reduces it during the last backward, the optimizer steps
(or every rank skips a non-finite step), the LR schedule steps. Every
``log_every`` steps the loss (mean over ranks) and the bytes all ranks have
sent so far go to ``metrics.jsonl``; every ``eval_every`` the val loss and
accuracy (images) or perplexity (text, ``val_perplexity``); every
``checkpoint_every`` an atomic checkpoint, always after the replicas are
compared (``replicas.py``; also every ``sync_check_every`` steps). At the end:
``summary.json`` and ``loss.png`` (and exit status 1 if the replicas differ).

One loss for both kinds of data: cross-entropy over the last dimension of the
logits, ``[B, classes]`` against ``[B]`` labels or ``[B, T, vocab]`` against
``[B, T]`` next tokens (the mean over every target).

How compression and optimizer combine:

- ``compression=birder`` (needs ``optim=birder``): ``Birder(ddp_model)``
  registers the 1-bit hook; each rank's own m, b are compressed to 1 bit per
  element and the hook averages the bits.
- ``compression=none|fp16|bf16|powersgd``: the baseline hook reduces the
  gradient; any optimizer then steps on the averaged gradient. With
  ``optim=birder`` that is ``Birder(module.parameters())``: the Birder
  algorithm on the averaged fp32 gradient, drawing the same bits on every rank
  (a rank-independent seed) so the replicas stay identical.

``sync=diloco`` (low-frequency synchronisation, :mod:`dist_supernet.sync`): DDP and the
baseline hook reduce over the ranks of one node only, and after every optimizer step the
trainer calls ``self.sync.step()``, which every ``sync.every`` steps exchanges the
pseudo-gradient between the nodes and applies the outer step (``final=True`` at the last
step: every replica ends equal). The replicas of different nodes differ between syncs, so the
model and the optimizer are checkpointed once per node (key ``node00001``), the sync state
once per rank.
"""

import contextlib
import gc
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig

from dist_supernet.comm.collectives import bucket_cap_mb
from dist_supernet.comm import CommStats, Topology, register_baseline_hook
from dist_supernet.models import build_model
from dist_supernet.optim import Birder
from dist_supernet.sync import DiLoCo, SyncGroups
from dist_supernet.train import distributed
from dist_supernet.train.checkpoint import (
    BirderRankState,
    CheckpointManager,
    ModelState,
    node_key,
    RNGState,
    StatefulGroup,
    TorchOptimizerState,
    rank_key,
)
from dist_supernet.train.config import ConfigError, TrainConfig
from dist_supernet.train.faults import DivergenceInjector, NanInjector
from dist_supernet.train.metrics import MetricsWriter, Progress
from dist_supernet.train.nonfinite import NonFiniteGuard
from dist_supernet.train.parallel import Parallel
from dist_supernet.train.preflight import check_config
from dist_supernet.train.replicas import ReplicaCheck, ReplicaDivergenceError
from dist_supernet.train.runlock import RunDirLock, report_stale, report_unfinished_runs
from dist_supernet.train.untrusted import check_fits_model, check_optimizer_state, check_recipe, check_steps_left

# Trainer.close: how long the gloo worker threads get (GIL released) to finish destroying their last works.
_GLOO_SETTLE_S = 0.1

log = logging.getLogger(__name__)


def setup_logging() -> None:
    """Rank 0 logs INFO to the console, the other ranks WARNING and up; all of them to their own file.

    Hydra has already attached a console and a per-rank file handler (conf/train.yaml);
    ``warnings.warn`` (e.g. Birder's resume fallback) goes through logging too.
    """
    logging.captureWarnings(True)
    if os.environ.get("RANK", "0") != "0":
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler:
                handler.setLevel(logging.WARNING)


@dataclass(frozen=True)
class SubnetPass:
    """One forward/backward per micro-batch: switch to the subnet, run it, learn.

    ``activate``: makes the model this subnet (e.g. ``supernet.set_active(arch)``); None: the model as it is.
    ``teaches``: its detached logits are the targets of the passes after it (in-place distillation).
    """

    activate: Callable[[], None] | None = None
    teaches: bool = False


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step runs: every micro-batch goes through ``passes`` in order.

    ``grad_mask``: called once per step, and only when the optimizer takes one (Birder's
    ``set_grad_mask``): bool [T] in ``parameters()`` order, the elements some pass reads;
    the same on every rank. None: every element may move.

    Example::
        StepPlan([SubnetPass()])                        # a plain model: one pass per micro-batch
        StepPlan([SubnetPass(partial(net.set_active, max_arch), teaches=True),
                  SubnetPass(partial(net.set_active, min_arch))], grad_mask=lambda: union_mask)
    """

    passes: list[SubnetPass]
    grad_mask: Callable[[], torch.Tensor] | None = None


class Trainer:
    """Everything one training run needs, built from the composed config.

    Example::
        trainer = Trainer(cfg, output_dir=Path("outputs/run"))   # on every rank, under torchrun
        summary = trainer.fit()
    """

    def __init__(self, cfg: DictConfig, output_dir: Path, *, check_only: bool = False):
        # 1. The one validation pass (preflight.check_config: every group, the data, the model on the meta
        #    device): every rank fails the same way before any process group, so nobody waits.
        #    ``check_only`` (the launchers' pre-flight, dist_supernet/train/preflight.py) stops after it.
        self.check_only = check_only
        self.checked = check_config(cfg, output_dir)
        self.cfg: TrainConfig = self.checked.cfg
        self.config_dict = self.checked.config_dict  # recorded in every checkpoint's manifest
        self.data = self.checked.data
        if check_only:
            self.model = self.checked.model  # meta device: the shapes for the pre-flight's resume check
            return
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        trainer_cfg = self.cfg.trainer
        torch.manual_seed(trainer_cfg.seed)  # same init on every rank (DDP broadcasts rank 0's anyway)
        model = build_model(self.cfg.model, **self.data.model_inputs())
        self.setup_model(model)

        # 2. The process group, one output directory (one job's: locked), rank-dependent randomness.
        self.device = distributed.init_distributed(trainer_cfg.device, timeout_s=trainer_cfg.timeout_s)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_rank0 = self.rank == 0
        self.output_dir = distributed.agree_on_output_dir(output_dir)
        self.run_locks = self._lock_run_dir()  # a second job into this directory stops here, on every rank
        distributed.start_orphan_watchdog()  # torchrun's agent SIGKILLed: its workers stop instead of training on
        torch.manual_seed(trainer_cfg.seed + self.rank)  # dropout etc. differ per rank, reproducibly
        self.topology = Topology.from_env(num_nodes=self.cfg.compression.num_nodes)
        # sync=diloco: DDP inside each node; the nodes exchange every sync.every steps (groups: all ranks, in order).
        self.sync_groups = (SyncGroups.create(self.topology, timeout_s=trainer_cfg.timeout_s)
                            if self.cfg.sync.name != "none" else None)

        # 3. Model, compression hook, optimizer, schedule, low-frequency synchronisation.
        self.model = model.to(self.device)
        ddp_kwargs = self.ddp_kwargs()
        if self.cfg.compression.name == "birder":  # buckets large enough that each peer's 1-bit message is >= 256 KiB
            ddp_kwargs.setdefault("bucket_cap_mb", self.cfg.compression.bucket_cap_mb or bucket_cap_mb(world_size))
        if self.sync_groups is not None:  # DDP inside the node only; the nodes meet in self.sync every H steps
            ddp_kwargs["process_group"] = self.sync_groups.inner
        # DDP (whole model per rank) or FSDP2 sharded inside each node (trainer.parallelism=hsdp; see parallel.py).
        self.parallel = Parallel.wrap(self.model, trainer_cfg.parallelism, device=self.device,
                                      num_nodes=self.cfg.compression.num_nodes,
                                      native=self.cfg.compression.name != "birder", ddp_kwargs=ddp_kwargs)
        self.ddp_model = self.parallel.module  # what the step calls: the DDP wrapper or the FSDP root
        self.optimizer, self.comm_stats = self._build_optimizer_and_hook()
        self.sync = None
        if self.sync_groups is not None:
            self.sync = DiLoCo.from_config(self.model, self.cfg.sync, seed=trainer_cfg.seed, groups=self.sync_groups,
                                           stats=self.comm_stats)
            log.log(logging.INFO if self.is_rank0 else logging.DEBUG, "DiLoCo: %s", self.sync.summary())
        # NaN/Inf on any rank: the step is skipped on every rank; too many in a row stop the job.
        self.nonfinite = NonFiniteGuard(self.optimizer, self.model, verbose=self.is_rank0,
                                        max_consecutive_skips=trainer_cfg.max_consecutive_skips)
        self.nan_injector = NanInjector(self.model, rank=self.rank, world_size=self.world_size,
                                        steps=trainer_cfg.inject_nan_at_steps)  # fault injection, tests only
        self.drift_injector = DivergenceInjector(self.model, rank=self.rank, world_size=self.world_size,
                                                 step=trainer_cfg.inject_divergence_at_step)  # tests only
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # The data hands out this rank's batches (images: its shard; text: its windows) and holds the position.
        self.sampler = self.data.train_batches(rank=self.rank, world_size=self.world_size,
                                               batch_size=trainer_cfg.batch_size, seed=trainer_cfg.seed,
                                               model=self.model)

        # 4. Outputs and resume.
        self.metrics = MetricsWriter(self.output_dir, enabled=self.is_rank0, tensorboard=trainer_cfg.tensorboard)
        self.checkpoints = CheckpointManager(
            trainer_cfg.checkpoint_dir or self.output_dir / "checkpoints", keep=trainer_cfg.keep_checkpoints,
            async_save=trainer_cfg.async_checkpoint,
        )
        self.step, self.wall_time_offset_s, self.resumed_from = 0, 0.0, None
        self.train_time_s = 0.0  # seconds inside train_step (no evaluation, logging or checkpoints): time to a loss
        try:
            self._resume()
        except BaseException:  # a refused checkpoint: release the run-directory locks and the process group now
            self.close()
            raise
        if self.resumed_from is None and self.is_rank0 and trainer_cfg.resume == "auto":
            report_unfinished_runs(self.output_dir)
        # Replicas compared every sync_check_every steps and before every checkpoint (replicas.py); hsdp: each
        # rank's shards against the ranks holding the same shards on the other nodes; sync=diloco: the ranks of
        # one node (the nodes' replicas differ between syncs by design; the end compares every rank's digest).
        group = self.parallel.mesh.get_group("replicate") if self.parallel.mesh else None
        if self.sync_groups is not None:
            group = self.sync_groups.inner
        self.replicas = ReplicaCheck(self.model, every=trainer_cfg.sync_check_every, device=self.device, group=group)
        # SIGTERM (a scheduler's preemption): every rank finishes its step, checkpoints, exits 143.
        self.preemption = distributed.PreemptionFlag()

    # -- setup helpers -----------------------------------------------------------------

    def _build_optimizer_and_hook(self) -> tuple[torch.optim.Optimizer, CommStats]:
        comp, opt = self.cfg.compression, self.cfg.optim
        if comp.name == "birder":
            hsdp = self.parallel.kind == "hsdp"
            optimizer = Birder(self.model.parameters() if hsdp else self.ddp_model, lr=opt.lr, beta=opt.beta,
                               beta2=opt.beta2, normalizer=opt.normalizer, grad_clip=opt.grad_clip,
                               weight_decay=opt.weight_decay, amsgrad=opt.amsgrad, collective=comp.collective,
                               requantize=comp.requantize, num_nodes=comp.num_nodes, inter_node=comp.inter_node,
                               seed=self.cfg.trainer.seed, timeout_s=comp.timeout_s or self.cfg.trainer.timeout_s)
            if hsdp:  # the 1-bit exchange across nodes, in FSDP's all-reduce hook (optim/fsdp.py)
                optimizer.attach(self.model, mesh=self.parallel.mesh, track_unused=self.track_unused())
            collective = optimizer.hook_state.collective
            form = f", inter-node {collective.form()}" if hasattr(collective, "form") and not hsdp else ""
            across = " across nodes (replicas of each shard)" if hsdp else ""
            log.log(logging.INFO if self.is_rank0 else logging.DEBUG,
                    "%s; Birder 1-bit collective%s: %s (compression.collective=%s, %d node(s) x %d rank(s)%s)",
                    self.parallel.describe(), across, collective.name, comp.collective, self.topology.num_nodes,
                    self.topology.local_world_size, form)
            return optimizer, optimizer.comm_stats
        if self.parallel.kind == "hsdp":
            stats = CommStats()  # native HSDP: FSDP's own collectives (counted per step by fsdp_step_bytes)
            log.log(logging.INFO if self.is_rank0 else logging.DEBUG, "%s; native fp32 all-reduce across nodes",
                    self.parallel.describe())
        else:
            topology = self.topology
            if self.sync_groups is not None:  # DDP reduces inside the node only: its bytes are intra-node
                local = self.topology.local_world_size
                topology = Topology(world_size=local, rank=self.topology.local_rank, local_world_size=local)
            stats = register_baseline_hook(self.ddp_model, comp, topology=topology)  # comp: the baseline's schema
        params = self.model.parameters()
        if opt.name == "birder":
            # collective=None: DDP (or the baseline hook) has averaged the gradient already, on purpose.
            optimizer = Birder(params, lr=opt.lr, beta=opt.beta, weight_decay=opt.weight_decay,
                               amsgrad=opt.amsgrad, seed=self.cfg.trainer.seed, collective=None, beta2=opt.beta2,
                               normalizer=opt.normalizer, grad_clip=opt.grad_clip)
        elif opt.name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                          weight_decay=opt.weight_decay, amsgrad=opt.amsgrad)
        else:
            optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov,
                                        weight_decay=opt.weight_decay)
        return optimizer, stats

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then constant or cosine decay to 0 at ``max_steps``."""
        warmup, total = self.cfg.optim.warmup_steps, self.cfg.trainer.max_steps
        if step < warmup:
            return (step + 1) / warmup
        if self.cfg.optim.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    def _resume(self) -> None:
        """Load ``trainer.resume`` (auto: the newest usable checkpoint) on every rank; see checkpoint.py.

        Before anything is loaded it must fit, one line naming the first key otherwise: the
        model's tensors (from the checkpoint's index) and model config, then the recipe
        (optimizer, compression and collective, supernet sampling), unless
        ``trainer.resume_weights_only=true``, which loads the model weights and nothing else.
        """
        tcfg = self.cfg.trainer
        key, resume = "trainer.resume", tcfg.resume
        found = None
        # Collective: every rank hashes a share of the files; all agree on one checkpoint (or none).
        if resume == "auto":
            found = self.checkpoints.find_latest(key, resume)
        elif resume != "never":
            found = self.checkpoints.open(Path(resume), key, resume)
        # Another run's checkpoints in this directory: resumed from, or the job refuses (checkpoint.claim).
        self.checkpoints.claim(None if tcfg.resume_weights_only else found, key, resume)
        if found is None:
            return
        model_path = found.model_path()  # a sync run keeps a replica per node
        check_fits_model(key, resume, found.path, {"model": found.shapes(*model_path), "config": found.config},
                         self.model, self.cfg.model)
        if tcfg.resume_weights_only:
            if len(model_path) == 1:
                self.checkpoints.load(found, {"model": ModelState(self.model)})
            else:  # node 0's replica (the nodes' replicas are equal only at a sync)
                self.checkpoints.load(found, {model_path[0]: StatefulGroup({"model": ModelState(self.model)})})
            log.log(logging.WARNING if self.is_rank0 else logging.INFO,
                    "trainer.resume_weights_only=true: loaded the model weights of %s (step %d) and nothing else; "
                    "optimizer state, LR schedule, data order and the step count start fresh", found.path, found.step)
            return
        check_recipe(key, resume, found.path.name, found.config, self.config_dict)
        check_optimizer_state(key, resume, found.path.name, found.optimizer_kind, self.cfg.optim.name)
        check_steps_left(found.path.name, found.step, tcfg.max_steps)
        # hsdp: the same world size on another node layout puts other shards on each rank.
        same_world = found.world_size == self.world_size and (found.manifest or {}).get("mesh") == self._mesh_shape()
        if self.sync is not None:
            nodes = (found.config.get("compression") or {}).get("num_nodes")
            if found.world_size != self.world_size or nodes != self.cfg.compression.num_nodes:
                raise ValueError(f"{key}={resume}: {found.path.name} holds DiLoCo state of {found.world_size} ranks "
                                 f"(compression.num_nodes={nodes}); resume it with the same ranks and nodes, or take "
                                 "only its weights with trainer.resume_weights_only=true")
        replicated, per_rank = self.checkpoint_components()
        replica = self.optimizer.replica_state() if isinstance(self.optimizer, Birder) else None
        if replica is not None and not same_world:
            replicated.pop(replica[0])  # this layout's replica key: loaded as the mean of the saved ones below
        with warnings.catch_warnings(record=True) as caught:  # folded into the one line below
            warnings.simplefilter("always")
            own = {rank_key(self.rank): StatefulGroup(per_rank)} if same_world else {}
            self.checkpoints.load(found, {**replicated, **own})
            if not same_world and isinstance(self.optimizer, Birder):
                # Saved rank 0's lr, step count and seed (the same on every rank), then the mean m, b.
                meta: dict = {}
                self.checkpoints.load(found, {rank_key(0): {"optimizer": {"meta": meta}}},
                                      rebuild=[(rank_key(0), "optimizer", "meta")])
                BirderRankState(self.optimizer).load_meta(meta)
                if replica is not None:  # hsdp: each saved replica's m, b resharded to this layout, averaged
                    self.checkpoints.load_replica_mean(found, "birder_replica", replica[1])
                else:
                    self.optimizer.load_rank_state(
                        self.checkpoints.load_mean(found, ("optimizer",), like=self.optimizer.rank_state()))
        # On another world size Birder warns that rank 0's state is not this rank's: the line below says it all.
        notes = "".join(f"; {w.message}" for w in caught) if same_world else ""
        if not same_world:  # one line on rank 0, the rest in each rank's log file
            if replica is not None:
                saved_mesh = (found.manifest or {}).get("mesh") or "?"
                mean = (f"; Birder: checkpoint holds m, b of the replicas of a {saved_mesh} mesh, this job's mesh is "
                        f"{self._mesh_shape()}: every rank starts from their mean, resharded")
            else:
                mean = (f"; Birder: checkpoint holds m, b of {found.world_size} ranks, this job has "
                        f"{self.world_size}: every rank starts from their mean") if isinstance(self.optimizer,
                                                                                          Birder) else ""
            log.log(logging.WARNING if self.is_rank0 else logging.INFO,
                    "checkpoint %s was written by %d ranks%s, this job has %d: resuming at the next epoch "
                    "with fresh RNG and byte counts, not bit-identically%s", found.path.name, found.world_size,
                    f" on a {(found.manifest or {}).get('mesh')} mesh" if replica is not None else "",
                    self.world_size, mean)
            # The shards differ: start the saved epoch's next one.
            self.sampler.load_state_dict({"epoch": self.sampler.epoch + 1, "batch_index": 0})
        elif notes:
            log.warning("checkpoint %s%s", found.path.name, notes)
        local_birder = isinstance(self.optimizer, Birder) and not self.optimizer.hooked
        if same_world and self.parallel.kind == "ddp" and local_birder:
            # Birder on an averaged gradient (compression != birder) keeps one m, b on every rank; the 1-bit
            # exchange's differ per rank, and loading them here would drive the replicas apart.
            digests = distributed.all_gather_object(distributed.tensors_sha256(self.optimizer.rank_state().values()))
            if len(set(digests)) > 1:
                raise ConfigError(key, resume, f"{found.path.name} holds Birder m, b that differ between ranks "
                                               "(written by the 1-bit exchange, compression=birder); this run has "
                                               f"compression={self.cfg.compression.name}, whose Birder steps on the "
                                               "averaged gradient and needs the same m, b on every rank: resume with "
                                               "compression=birder, or trainer.resume_weights_only=true")
        self.load_extra_state(replicated["extra"])
        progress = replicated["progress"]
        if int(progress["step"]) != found.step:  # the manifest or directory name against the checkpoint's own item
            raise ConfigError(key, resume, f"{found.path.name} is named for step {found.step} but holds the state "
                                           f"of step {int(progress['step'])}")
        self.step, self.wall_time_offset_s = int(progress["step"]), float(progress["wall_time_s"])
        self.train_time_s = float(progress["train_time_s"])  # 0 from a checkpoint written before it was saved
        self.resumed_from = self.step
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", found.path, self.step)

    def checkpoint_components(self, wall_time_s: float = 0.0) -> tuple[dict, dict]:
        """What a checkpoint holds: (components the same on every rank, saved once; this rank's own).

        Each is ``Stateful`` (``state_dict``/``load_state_dict``) or a plain dict; see checkpoint.py.
        """
        replicated = {
            "model": ModelState(self.model),
            "scheduler": self.scheduler,
            "sampler": self.sampler,  # the same position on every rank
            "nonfinite": self.nonfinite,
            "progress": {"step": self.step, "wall_time_s": wall_time_s, "train_time_s": self.train_time_s},
            "extra": self.extra_state(),
        }
        per_rank = {"rng": RNGState(), "comm_stats": self.comm_stats}
        if isinstance(self.optimizer, Birder):
            per_rank["optimizer"] = BirderRankState(self.optimizer)  # m, b differ per rank: each writes its own
            replica = self.optimizer.replica_state()
            if replica is not None:  # hsdp: m, b as DTensors like the parameters, one key per replica
                replicated[replica[0]] = replica[1]
        else:
            replicated["optimizer"] = TorchOptimizerState(self.optimizer)  # averaged gradient: the same everywhere
        if self.sync is not None:
            # Between syncs each node has its own replica and optimizer state (the same on its ranks: stored
            # once per node); the sync state is this rank's shards (DiLoCo.state_dict waits for exchanges).
            node = {"model": replicated.pop("model"), "optimizer": replicated.pop("optimizer")}
            replicated[node_key(self.topology.node_rank)] = StatefulGroup(node)
            per_rank["sync"] = self.sync
        return replicated, per_rank

    # -- hooks for subclasses (SupernetTrainer) ------------------------------------------

    def setup_model(self, model: torch.nn.Module) -> None:
        """Before the process group exists: model-specific state from the checked config (``self.checked``).

        Called by ``Trainer.__init__`` once the config is checked; a subclass builds its model-specific
        state here and needs none before ``super().__init__``.
        """

    def plan_step(self) -> StepPlan:
        """What the coming step (``self.step + 1``) runs: here, the model itself, once per micro-batch."""
        return StepPlan([SubnetPass()])

    def loss(self, logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        """A pass's loss: cross-entropy on the targets (``teacher_logits``: None, no pass of a plain step teaches).

        ``logits`` ``[..., classes]`` against ``y`` ``[...]``: image labels ``[B]`` or next tokens ``[B, T]``.
        """
        return F.cross_entropy(logits.flatten(0, -2), y.flatten())

    def ddp_kwargs(self) -> dict:
        """Extra keyword arguments for ``DistributedDataParallel``."""
        return {}

    def _mesh_shape(self) -> list[int] | None:
        """hsdp: [nodes, ranks per node] of the device mesh (checkpoints record it); None for ddp."""
        mesh = getattr(getattr(self, "parallel", None), "mesh", None)
        return list(mesh.mesh.shape) if mesh is not None else None

    def track_unused(self) -> bool:
        """Under hsdp with Birder: whether some parameters may get no gradient in a step (see Birder.attach)."""
        return False

    def extra_state(self) -> dict:
        """Entries added to every checkpoint, the same on every rank (saved once; no collectives)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what ``extra_state`` saved (every rank, same checkpoint; ``state`` is that dict)."""

    def extra_summary(self) -> dict:
        """Keys added to ``summary.json`` (every rank; no collectives)."""
        return {}

    # -- the loop ----------------------------------------------------------------------

    def fit(self) -> dict:
        """Train to ``trainer.max_steps``; returns (and rank 0 writes) the summary."""
        tcfg = self.cfg.trainer
        progress = Progress(tcfg.max_steps, self.step, enabled=self.is_rank0, log_every=tcfg.log_every)
        start_time = time.perf_counter() - self.wall_time_offset_s
        with distributed.collective_stage("replica check"):
            self.replicas.check(self.step, when=" (before training)")
        last_row = None
        self.ddp_model.train()
        while self.step < tcfg.max_steps:
            self._maybe_crash()
            self.nan_injector.arm(self.step + 1)
            step_start = time.perf_counter()
            with distributed.collective_stage(f"train step {self.step + 1}"):  # a stopped peer: named, not raw
                loss = self.train_step()
            self.step += 1
            if self.sync is not None:  # every sync.every steps: the nodes exchange; the last step ends in sync
                with distributed.collective_stage(f"sync after step {self.step}"):
                    self.sync.step(final=self.step == tcfg.max_steps)
            self.train_time_s += time.perf_counter() - step_start  # the step and its exchanges, not evaluation
            self.drift_injector.after_step(self.step)

            row = None
            is_last = self.step == tcfg.max_steps
            eval_now = tcfg.eval_every > 0 and self.step % tcfg.eval_every == 0
            if is_last or eval_now or (tcfg.log_every > 0 and self.step % tcfg.log_every == 0):
                row = self._metrics_row(loss, time.perf_counter() - start_time)
                if eval_now or is_last:
                    with distributed.collective_stage("evaluate"):
                        row.update({f"val_{k}": v for k, v in self.evaluate().items()})
                self.metrics.write(row)
                last_row = row
            progress.update(self.step, row)

            saved = is_last or (tcfg.checkpoint_every > 0 and self.step % tcfg.checkpoint_every == 0)
            if saved or self.replicas.due(self.step):  # never a checkpoint of diverged replicas
                with distributed.collective_stage("replica check"):
                    self.replicas.check(self.step)
            if saved:
                with distributed.collective_stage("checkpoint"):  # the last one is always synchronous
                    self.save_checkpoint(time.perf_counter() - start_time, blocking=is_last)
            # One tiny all-reduce per step: a SIGTERM on any rank stops every rank after this same step.
            if not is_last and self.preemption.agreed(self.device, stage=f"stop flag after step {self.step}"):
                if not saved:
                    with distributed.collective_stage("replica check"):
                        self.replicas.check(self.step)
                    with distributed.collective_stage("checkpoint"):
                        self.save_checkpoint(time.perf_counter() - start_time)
                with distributed.collective_stage("checkpoint"):
                    self.checkpoints.wait()  # an asynchronous save of this step is committed before the exit
                progress.close()
                raise distributed.Preempted(self.step, self.preemption.signal_name)
        progress.close()
        return self._finish(last_row, time.perf_counter() - start_time)

    def train_step(self) -> torch.Tensor:
        """One optimizer step: the plan's passes on each of ``grad_accum`` micro-batches, one exchange.

        Returns this rank's logged loss: the first pass's (a sandwich's max subnet), mean over micro-batches.
        """
        plan = self.plan_step()
        if plan.grad_mask is not None and isinstance(self.optimizer, Birder):
            self.optimizer.set_grad_mask(plan.grad_mask())  # untouched elements keep x, m and b
        num_micro, num_passes = self.cfg.trainer.grad_accum, len(plan.passes)
        logged_loss = torch.zeros((), device=self.device)
        for micro in range(num_micro):
            x, y = next(self.sampler)
            x, y = x.to(self.device), y.to(self.device)
            teacher_logits = None
            for i, subnet in enumerate(plan.passes):
                if subnet.activate is not None:
                    subnet.activate()
                # Reduce once per step: every earlier backward (subnet, micro-batch) only accumulates locally.
                last = micro == num_micro - 1 and i == num_passes - 1
                with contextlib.nullcontext() if last else self.parallel.no_sync():
                    logits = self.ddp_model(x)
                    loss = self.loss(logits, y, teacher_logits)
                    (loss / num_micro).backward()
                if i == 0:
                    logged_loss += loss.detach() / num_micro
                if subnet.teaches:
                    teacher_logits = logits.detach()
        if self.parallel.kind == "hsdp":  # FSDP's own all-gathers and reduce-scatters (and native HSDP's all-reduce)
            self.comm_stats.add(self.parallel.step_bytes(self.topology, passes=num_micro * num_passes), exchanges=0)
        # AdamW, SGD: on the averaged gradient, same on every rank. Birder clips each rank's own gradient itself.
        clip = getattr(self.cfg.optim, "grad_clip", None)
        if clip is not None and self.cfg.optim.name != "birder":
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.nonfinite.step(self.step + 1)  # optimizer.step(), or skipped on every rank if any saw NaN/Inf
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logged_loss

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict:
        """The data's metrics on its fixed val (or test) set, the same on every rank (collective).

        Each rank scores its share of the set (``data.eval_batches``), the sums are all-reduced.
        Images: ``{"loss", "accuracy"}``; text: ``{"loss", "perplexity"}`` (loss: mean nats per target).
        """
        model = self.parallel.eval_model()  # hsdp: the whole model, gathered from the shards
        model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for x, y in self.data.eval_batches(split, rank=self.rank, world_size=self.world_size,
                                           batch_size=self.cfg.trainer.batch_size, model=self.model):
            x, y = x.to(self.device), y.to(self.device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum").item()
            correct += (logits.argmax(dim=-1) == y).sum().item()
            count += y.numel()
        loss_sum, correct, count = distributed.all_reduce_sum([loss_sum, correct, count], self.device)
        model.train()
        return self.data.eval_metrics(loss_sum / count, correct / count)

    def _metrics_row(self, loss: torch.Tensor, wall_time_s: float) -> dict:
        snap = self.comm_stats.snapshot()
        loss_sum, intra, inter = distributed.all_reduce_sum(
            [loss.item(), snap["bytes_intra"], snap["bytes_inter"]], self.device, stage="metrics"
        )
        return {
            "step": self.step,
            "epoch": self.sampler.epoch,
            "loss": loss_sum / self.world_size,
            "lr": self.optimizer.param_groups[0]["lr"],
            "wall_time_s": round(wall_time_s, 4),
            "train_time_s": round(self.train_time_s, 4),  # rank 0's time in training steps alone
            # cumulative bytes all ranks have put on the wire
            "bytes_sent": int(intra + inter),
            "bytes_intra": int(intra),
            "bytes_inter": int(inter),
            "skipped_steps": self.nonfinite.skipped_steps,  # steps skipped for a NaN/Inf gradient on some rank
        }

    def save_checkpoint(self, wall_time_s: float, *, blocking: bool = True) -> None:
        """Collective: every rank writes its own shard of one checkpoint (checkpoint.py); nothing is gathered.

        ``blocking=False`` with ``trainer.async_checkpoint=true``: the files are written in the
        background and committed at the next save (``self.checkpoints.wait()`` commits it now).
        """
        # The clocks differ by rank, and DCP writes a replicated item from whichever rank its planner picks: rank 0's
        # on every rank, so that a resume continues the metrics rows' times (never a step that took negative time).
        wall_time_s, self.train_time_s = distributed.broadcast_object((wall_time_s, self.train_time_s),
                                                                      stage="checkpoint clocks")
        replicated, per_rank = self.checkpoint_components(wall_time_s)
        path = self.checkpoints.save(replicated, per_rank, step=self.step, blocking=blocking,
                                     manifest={"wall_time_s": wall_time_s, "config": self.config_dict,
                                               "mesh": self._mesh_shape()})
        log.debug("saved %s", path)

    def _maybe_crash(self) -> None:
        """Fault injection (``trainer.crash_at_step``): the last rank dies once, on torchrun's first attempt."""
        crash_at = self.cfg.trainer.crash_at_step
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if crash_at == self.step and first_attempt and self.rank == self.world_size - 1:
            log.warning("trainer.crash_at_step=%d: crashing on purpose", crash_at)
            logging.shutdown()
            os._exit(17)

    # -- the end -----------------------------------------------------------------------

    def _finish(self, last_row: dict | None, wall_time_s: float) -> dict:
        if last_row is None:  # resumed at or past max_steps: nothing trained in this attempt
            rows = distributed.broadcast_object(self.metrics.rows() if self.is_rank0 else None)
            last_row = {"loss": rows[-1]["loss"] if rows else None}
            last_row.update({f"val_{k}": v for k, v in self.evaluate().items()})
        in_sync, digest = self.parallel.replicas_in_sync()
        per_rank = distributed.all_gather_object(self.comm_stats.snapshot())
        comp = self.cfg.compression
        summary = {
            "final_loss": last_row["loss"],
            # eval_loss with eval_accuracy (images) or eval_perplexity (text)
            **{f"eval_{k[4:]}": v for k, v in last_row.items() if k.startswith("val_")},
            "steps": self.step,
            "world_size": self.world_size,
            "num_nodes": self.topology.num_nodes,
            "compression": comp.name,
            # the collective that ran (compression.collective=auto resolved by the node layout)
            "collective": self.optimizer.hook_state.collective.name if comp.name == "birder" else comp.collective,
            "sync": self.sync.summary() if self.sync is not None else None,
            "optimizer": self.cfg.optim.name,
            "model": self.cfg.model["name"],
            "dataset": self.cfg.data.name,
            **self.data.info(),
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "bytes_sent_total": sum(s["bytes_total"] for s in per_rank),
            "bytes_intra_total": sum(s["bytes_intra"] for s in per_rank),
            "bytes_inter_total": sum(s["bytes_inter"] for s in per_rank),
            "bytes_sent_per_rank": [s["bytes_total"] for s in per_rank],
            "params_in_sync": in_sync,
            "sync_checks": {"every": self.replicas.every, "num_checks": self.replicas.num_checks,
                            "seconds": round(self.replicas.seconds, 6)},
            "params_sha256": digest,
            "parallelism": self.parallel.kind,
            "wall_time_s": round(wall_time_s, 3),
            "train_time_s": round(self.train_time_s, 3),
            "resumed_from_step": self.resumed_from,
            "skipped_steps": self.nonfinite.skipped_steps,
            "seed": self.cfg.trainer.seed,
            "device": str(self.device),
            "host": platform.node(),
            "torch": torch.__version__,
        }
        if self.data.has_test:  # scored once, at the end: nothing during training looked at it
            test = self.evaluate("test")
            summary.update({f"test_{k}": v for k, v in test.items()})
            self.metrics.scalars({f"test/{k}": v for k, v in test.items()}, step=self.step)
        summary.update(self.extra_summary())
        if self.is_rank0:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            title = f"{comp.name}/{comp.collective}, {self.cfg.optim.name}, {self.world_size} ranks"
            self.metrics.plot_loss(self.output_dir / "loss.png", title=title)
            metric = "accuracy" if "eval_accuracy" in summary else "perplexity"
            val = f"val {metric} {summary[f'eval_{metric}']:.4f}"
            if metric == "perplexity":
                val = f"val loss {summary['eval_loss']:.4f}, {val}"
            test = f", test {metric} {summary[f'test_{metric}']:.4f}" if f"test_{metric}" in summary else ""
            log.info("done: loss %s, %s%s, %.2f MiB sent, params in sync: %s -> %s",
                     summary["final_loss"], val, test, summary["bytes_sent_total"] / 2**20,
                     summary["params_in_sync"], self.output_dir)
        self.metrics.close()
        if not summary["params_in_sync"]:  # a run that ends with two models never ends as a success
            raise ReplicaDivergenceError(f"step {self.step}: the replicas differ at the end of the run (parameter "
                                         f"sha256 of the ranks holding the same part of the model differ; "
                                         f"{self.parallel.describe()}); summary.json says params_in_sync: false")
        return summary

    def close(self) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()  # a run that stopped early: the events so far reach the file
        if getattr(self, "preemption", None) is not None:
            self.preemption.restore()
        for lock in getattr(self, "run_locks", []):
            lock.release()
        # A gloo worker thread destroys each finished work itself, which takes the GIL (the work holds
        # tensors); a gloo group's destructor joins those threads while its caller holds the GIL. Dropping
        # a group right after the last collective therefore deadlocked (py-spy on rank 1 of test_faults'
        # AdamW job: MainThread in ~ProcessGroupGloo -> thread::join, the worker in ~AsyncWork waiting for
        # the GIL; 2 of 3 runs on 2026-12-01). Sleeping releases the GIL: the workers finish and go idle.
        # Before destroy_process_group (it may destroy a group nothing else holds) and after it (before the
        # groups DDP and the hook state hold are dropped below).
        time.sleep(_GLOO_SETTLE_S)
        if dist.is_initialized():
            dist.destroy_process_group()
            time.sleep(_GLOO_SETTLE_S)
        # destroy_process_group only unregisters the groups: the hook state and DDP still hold theirs. Drop
        # them now, while the interpreter is whole; a gloo group first destroyed during interpreter
        # finalization can abort the process ("terminate called without an active exception", seen once in
        # two runs of the default job on rank 1 after its last collective).
        hook_state = getattr(getattr(self, "optimizer", None), "hook_state", None)
        if hook_state is not None:
            hook_state.close()
        if getattr(self, "sync", None) is not None:
            self.sync.close()
        for name in ("optimizer", "ddp_model", "scheduler", "nonfinite", "sync", "sync_groups"):
            if hasattr(self, name):
                setattr(self, name, None)
        gc.collect()

    def _lock_run_dir(self) -> list[RunDirLock]:
        """Rank 0 locks the run directory (and a checkpoint_dir outside it) for the job's life; every rank
        learns the outcome, so a busy directory stops the whole job, before training, with the same line."""
        locks, error = [], None
        if self.is_rank0:
            # The checkpoint directory too, even inside the run directory: another job may point its
            # trainer.checkpoint_dir at <this run>/checkpoints.
            ckpt_dir = self.cfg.trainer.checkpoint_dir or self.output_dir / "checkpoints"
            wanted = [RunDirLock(self.output_dir, key="hydra.run.dir"),
                      RunDirLock(ckpt_dir, key="trainer.checkpoint_dir")]
            try:
                stale = []
                for lock in wanted:
                    stale.append(lock.acquire())
                    locks.append(lock)
                report_stale(locks[0], next((s for s in stale if s), None))  # one line, not one per lock
            except ConfigError as e:
                error = str(e)
                for lock in locks:
                    lock.release()
        error = distributed.broadcast_object(error, stage="run directory lock")
        if error is not None:
            raise ValueError(error)
        return locks
