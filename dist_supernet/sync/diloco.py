"""Low-frequency synchronisation between worker groups: DiLoCo and Streaming DiLoCo with a compressed exchange.

Legend: H inner steps per sync (``sync_every``), F fragments, N nodes (worker groups), L ranks
per node, tau the delay (inner steps an exchange overlaps), D elements of a fragment.

**Who talks to whom.** A worker group is one node. Inside it the ranks train one replica with
DDP as usual (the *inner* group: every step, over the fast link). Across nodes nothing is
exchanged per step. Every H steps each fragment's pseudo-gradient, delta = (weights at the
last sync) - (weights now), is averaged over the nodes and an outer optimizer steps from the
weights at the last sync. The L ranks of a node hold the same replica, so none sends the whole
fragment: local rank l owns shard l of each fragment (1 / L of it) and averages it with the
ranks of local rank l on the other nodes (the *cross* group, the same groups the hierarchical
1-bit collective uses); after the outer step an all-gather inside the node (the *node* group,
fast) gives every rank the whole fragment. The cross-node bytes of a node are therefore one
fragment's payload, spread over its L ranks' links.

**Schedule.** Not streamed: every fragment at steps H, 2H, ..., each exchange blocking, the
result replaces the fragment's weights (DiLoCo). Streamed (Streaming DiLoCo): fragment f is
sent at steps o_f + kH with o_f = floor(H (f + 1) / F), so sends are spread over the H steps;
the exchange runs on a worker thread while the next tau inner steps run, and its result is
merged after them, at step o_f + kH + tau (tau = 0: at once, blocking).

**The merge of an overlapped result.** During the tau steps the replica moved on from the
weights it sent (theta_sent) to theta_local; the exchange produced theta_global, the outer
step from the last sync's weights. ``merge="mix"`` (Streaming DiLoCo's rule):
theta = alpha theta_local + (1 - alpha) theta_global, so a fraction alpha of the tau steps'
progress survives (alpha = 0 discards it, as torchft does). ``merge="delta"``:
theta = theta_global + (theta_local - theta_sent): every inner step since the send is kept,
applied on top of the global weights, and the next pseudo-gradient (measured from
theta_global) counts those steps once. Either way the weights at the last sync become
theta_global, identical on every node; the replicas themselves are identical across nodes
right after a blocking merge (tau = 0) and after :meth:`DiLoCo.finish`.

**Outer optimizers.** ``nesterov`` (DiLoCo: SGD with Nesterov momentum on the averaged
pseudo-gradient, torch's formula), ``sgd`` (no momentum; lr 1 is plain model averaging),
``birder`` (Birder's m, b over pseudo-gradients, one random bit each, exchanged by the 1-bit
collectives of :mod:`dist_supernet.comm` through :class:`~dist_supernet.optim.BirderCompressor`,
and theta -= lr * mean(bits)). The first two take the average from a
:class:`~dist_supernet.sync.exchange.MeanExchange` over a quantizer (fp32, int4, onebit).

**State** (on ``backup_device``, this rank's shards only): the weights at the last sync, the
outer momentum or Birder's m and b, and the result of an exchange still to be merged.
``state_dict`` first waits for exchanges in flight, so a checkpoint holds no half-done
exchange; a resumed run merges the saved result at the same step and ends bit-identical.
"""

import concurrent.futures
import dataclasses
from datetime import timedelta

import torch
import torch.distributed as dist

from dist_supernet import kernels
from dist_supernet.comm import CommGroups, CommStats, Topology, WireBytes, mix_seed
from dist_supernet.comm.stats import all_gather_bytes
from dist_supernet.errors import ConfigError
from dist_supernet.optim.compressor import BirderCompressor
from dist_supernet.sync.config import DiLoCoConfig, check
from dist_supernet.sync.exchange import MeanExchange, node_topology, resolve_form
from dist_supernet.sync.fragments import FlatParams, split_fragments
from dist_supernet.sync.quantizers import build_quantizer

_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

SEND_REGULAR = 0  # seed stream of the scheduled exchanges
SEND_FINAL = 1  # seed stream of finish()'s exchanges (a fragment may have been sent at the same step)
STAGE_BIRDER = 7  # seed stream of Birder-outer's draws, per fragment and shard


@dataclasses.dataclass
class SyncGroups:
    """The process groups of low-frequency synchronisation (collective to create: every rank, same order).

    ``inner``: the node's ranks, for DDP (the training thread). ``node``: the node's ranks again, for
    the sync thread's all-gather (a group of its own, so its collectives never interleave with DDP's).
    ``cross``: this local rank on every node, the exchange. All None without a process group.
    """

    topology: Topology
    inner: object | None = None
    node: object | None = None
    cross: object | None = None

    @classmethod
    def create(cls, topology: Topology, *, timeout_s: float | None = None) -> "SyncGroups":
        """Example::
            groups = SyncGroups.create(Topology.from_env(num_nodes=2))     # on every rank
            ddp = DistributedDataParallel(model, process_group=groups.inner)
        """
        if not (dist.is_available() and dist.is_initialized()) or topology.world_size == 1:
            return cls(topology)
        comm = CommGroups.create(topology, hierarchical=True, timeout_s=timeout_s)
        kwargs = {"timeout": timedelta(seconds=float(timeout_s))} if timeout_s is not None else {}
        inner, _ = dist.new_subgroups_by_enumeration(
            [topology.node_members(n) for n in range(topology.num_nodes)], **kwargs)
        return cls(topology, inner=inner, node=comm.node, cross=comm.cross)


class _Pending:
    """An exchange sent at ``send_step``: its future until it is done, then its result."""

    def __init__(self, send_step: int, merge_step: int, blocking: bool, future=None, values=None):
        self.send_step, self.merge_step, self.blocking = send_step, merge_step, blocking
        self.future, self.values = future, values

    def result(self) -> torch.Tensor:
        if self.future is not None:
            self.values, self.future = self.future.result(), None
        return self.values


class _BirderOuter:
    """Birder as one shard's outer optimizer: m, b over its pseudo-gradients, 1 bit each across the nodes."""

    def __init__(self, target: torch.Tensor, *, lr: float, beta: float, seed: int, groups: SyncGroups, form: str):
        self.target, self.lr = target, lr
        self.comp = BirderCompressor([target], beta=beta, seed=seed)
        topo = groups.topology
        if groups.cross is not None and topo.num_nodes > 1:
            # The compressor's collective on the cross group, seen as N single-rank nodes: its draws are keyed
            # by the node (independent across nodes); two_phase re-quantizes its phase 2 to one bit.
            name = "allgather" if resolve_form(form, topo.num_nodes) == "allgather" else "two_phase"
            self.comp.connect(name, requantize=True, topology=node_topology(topo.num_nodes, topo.node_rank),
                              groups=CommGroups(world=groups.cross))
        # comp.stats counts on the sync thread; DiLoCo counts wire_bytes() when it sends, on the training thread.

    def wire_bytes(self, numel: int) -> WireBytes:
        return self.comp.collective.wire_bytes(numel) if self.comp.collective is not None else WireBytes()

    def step(self, delta: torch.Tensor) -> None:
        """target -= lr * (mean over nodes of one Birder bit per element of ``delta``)."""
        self.comp.step += 1
        chunk = self.comp.chunk([self.target])
        packed = self.comp.exchange(delta, chunk)
        self.target.sub_(packed.mean(chunk.numel).mul_(self.lr))


@dataclasses.dataclass
class _FragmentState:
    backup: torch.Tensor  # float32 [shard]: the weights at the last sync (theta_global)
    momentum: torch.Tensor | None = None  # float32 [shard]: nesterov's buffer
    birder: _BirderOuter | None = None
    synced_at: int = 0  # the step of the last blocking merge (all replicas equal then)


class DiLoCo:
    """DiLoCo / Streaming DiLoCo over worker groups (nodes), a compressed pseudo-gradient exchange, any inner optimizer.

    Call :meth:`step` after every inner optimizer step (or use it as a context manager: it hooks
    ``inner_optimizer.step``), and :meth:`finish` at the end (the context manager does), so every
    replica ends identical. All ranks construct it, in the same order, after the process group.
    Options: see :class:`~dist_supernet.sync.config.DiLoCoConfig` and docs/diloco.md.

    Example::
        groups = SyncGroups.create(Topology.from_env())
        model = DistributedDataParallel(net, process_group=groups.inner)     # DDP inside the node only
        inner = torch.optim.AdamW(net.parameters(), lr=1e-3)
        with DiLoCo(net, inner, sync_every=100, fragments=4, quantizer="onebit", streaming=True, groups=groups):
            for x, y in loader:
                loss_fn(model(x), y).backward()
                inner.step()
                inner.zero_grad()
    """

    def __init__(self, model, inner_optimizer=None, *, sync_every: int = 100, fragments=1,
                 outer_optimizer: str = "nesterov", outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 quantizer: str = "onebit", streaming: bool = False, delay: int | None = None, merge: str = "mix",
                 merge_alpha: float = 0.5, form: str = "auto", backup_device: str = "cpu", birder_beta: float = 0.9,
                 seed: int = 0, groups: SyncGroups | None = None, num_nodes: int | None = None,
                 stats: CommStats | None = None, timeout_s: float | None = None):
        num_fragments = fragments if isinstance(fragments, int) else len(fragments)
        cfg = DiLoCoConfig(every=sync_every, fragments=num_fragments, outer=outer_optimizer, outer_lr=outer_lr,
                           outer_momentum=outer_momentum, quantizer=quantizer, streaming=streaming, delay=delay,
                           merge=merge, merge_alpha=merge_alpha, form=form, backup_device=backup_device,
                           birder_beta=birder_beta)
        try:
            check(cfg)
        except ConfigError as error:  # the library's names for the two keys the config group spells otherwise
            key = {"every": "sync_every", "outer": "outer_optimizer"}.get(error.key, error.key)
            raise ConfigError(key, error.value, error.reason) from None
        self._setup(model, inner_optimizer, cfg, fragments, seed=seed, groups=groups, num_nodes=num_nodes,
                    stats=stats, timeout_s=timeout_s)

    @classmethod
    def from_config(cls, model, cfg: DiLoCoConfig, **kwargs) -> "DiLoCo":
        """From the ``sync`` config group (already checked by the app), e.g. the trainer's."""
        self = cls.__new__(cls)
        self._setup(model, None, check(cfg), cfg.fragments, **kwargs)
        return self

    def _setup(self, model, inner_optimizer, cfg, fragments, *, seed=0, groups=None, num_nodes=None, stats=None,
               timeout_s=None):
        # hyperparameters
        self.cfg = cfg
        self.delay = cfg.resolved_delay()
        self.seed = int(seed)
        self.inner_optimizer = inner_optimizer
        self.groups = groups if groups is not None else SyncGroups.create(Topology.from_env(num_nodes),
                                                                          timeout_s=timeout_s)
        topo = self.groups.topology
        self.backup_device = torch.device(cfg.backup_device)
        self.params = list(model.parameters())
        self.flat = FlatParams(self.params)
        self.quantizer = None if cfg.quantizer == "birder" else build_quantizer(cfg.quantizer)
        granule = self.quantizer.granule if self.quantizer is not None else 8
        self.fragments = split_fragments(self.params, fragments, local_rank=topo.local_rank,
                                         local_world_size=topo.local_world_size, granule=granule)
        self.offsets = [cfg.every * (f + 1) // len(self.fragments) if cfg.streaming else cfg.every
                        for f in range(len(self.fragments))]
        self.stats = stats if stats is not None else CommStats()
        self.exchange = None
        if self.quantizer is not None:
            self.exchange = MeanExchange(self.quantizer, self.groups.cross, num_nodes=topo.num_nodes,
                                         node_rank=topo.node_rank, form=cfg.form)
        # state (this rank's shards, on backup_device)
        self.num_steps = 0
        self.state = []
        for frag in self.fragments:
            backup = self.flat.gather(frag, frag.shard_lo, frag.shard_hi, device=self.backup_device)
            st = _FragmentState(backup)
            if cfg.outer == "nesterov":
                st.momentum = torch.zeros_like(backup)
            elif cfg.outer == "birder":
                st.birder = _BirderOuter(backup, lr=cfg.outer_lr, beta=cfg.birder_beta, groups=self.groups,
                                         seed=mix_seed(self.seed, STAGE_BIRDER, frag.index, topo.local_rank),
                                         form=cfg.form)
            self.state.append(st)
        self.pending: dict[int, _Pending] = {}
        self._executor = None
        self._hook = None
        if cfg.quantizer != "fp32":  # load (or compile) the kernels now, not inside the first exchange
            kernels.warmup(self.backup_device)
        self._check_same_start()

    # -- the schedule ------------------------------------------------------------------

    def due(self, fragment: int, step: int) -> bool:
        """Whether ``fragment`` is sent after inner step ``step`` (1-based)."""
        offset = self.offsets[fragment]
        return step >= offset and (step - offset) % self.cfg.every == 0

    def step(self, *, final: bool = False) -> None:
        """After one inner optimizer step (every rank): send the fragments due, merge the results due.

        ``final=True``: then :meth:`finish`.
        """
        self.num_steps += 1
        step = self.num_steps
        for frag in self.fragments:
            if self.due(frag.index, step):
                self._send(frag, step, SEND_REGULAR, blocking=self.delay == 0)
        for index in sorted(self.pending):
            if self.pending[index].merge_step <= step:
                self._merge(index)
        if final:
            self.finish()

    def finish(self) -> None:
        """Merge what is in flight, then exchange every fragment not just synced, blocking: all replicas equal."""
        for index in sorted(self.pending):
            self._merge(index)
        for frag in self.fragments:
            if self.state[frag.index].synced_at != self.num_steps:
                self._send(frag, self.num_steps, SEND_FINAL, blocking=True)
                self._merge(frag.index)

    def wait(self) -> None:
        """Wait for the exchanges in flight; their results are kept until their merge step."""
        for index in sorted(self.pending):
            self.pending[index].result()

    # -- one fragment ------------------------------------------------------------------

    def _send(self, frag, step: int, kind: int, *, blocking: bool) -> None:
        assert frag.index not in self.pending, "a fragment is sent again before its result was merged"
        st = self.state[frag.index]
        local = self.flat.gather(frag, frag.shard_lo, frag.shard_hi, device=self.backup_device)
        delta = st.backup - local  # the pseudo-gradient: weights at the last sync minus now
        seed = mix_seed(self.seed, frag.index, step, kind)
        want_global = blocking or self.cfg.merge == "mix"
        # Counted here, on the training thread, when the exchange starts: every rank's counts are the same
        # at every step and in every checkpoint, whether the sync thread has finished or not.
        self.stats.add(self.wire_bytes(frag))
        future = self._worker().submit(self._exchange, frag, delta, seed, want_global)
        self.pending[frag.index] = _Pending(step, step if blocking else step + self.delay, blocking, future=future)

    def _exchange(self, frag, delta: torch.Tensor, seed: int, want_global: bool) -> torch.Tensor:
        """The sync thread's part: average, outer step (theta_global), the node's all-gather of the result."""
        st, cfg = self.state[frag.index], self.cfg
        sent = None if want_global else st.backup - delta
        if st.birder is not None:
            if delta.numel():
                st.birder.step(delta)
        else:
            mean = self.exchange.mean(delta, seed)
            if st.momentum is not None:  # torch's Nesterov SGD: buf = mu buf + g; theta -= lr (g + mu buf)
                st.momentum.mul_(cfg.outer_momentum).add_(mean)
                mean = mean.add(st.momentum, alpha=cfg.outer_momentum)
            st.backup.sub_(mean.mul_(cfg.outer_lr))
        return self._gather_in_node(frag, st.backup if want_global else sent - st.backup)

    def wire_bytes(self, frag) -> WireBytes:
        """What one exchange of ``frag`` sends from this rank: its shard between nodes, the all-gather in the node."""
        topo, st = self.groups.topology, self.state[frag.index]
        if st.birder is not None:
            wire = st.birder.wire_bytes(frag.shard_len) if frag.shard_len else WireBytes()
        else:
            wire = self.exchange.wire_bytes(frag.shard_len)
        if topo.local_world_size > 1 and self.groups.node is not None:
            wire = wire + all_gather_bytes(4 * frag.shard_numel, topo.node_members(topo.node_rank), topo)
        return wire

    def _gather_in_node(self, frag, shard: torch.Tensor) -> torch.Tensor:
        """Every local rank's shard of the fragment, in order: float32 [D] (fast link, intra-node bytes)."""
        topo = self.groups.topology
        padded = shard.new_zeros(frag.shard_numel)
        padded[:shard.numel()] = shard
        if topo.local_world_size == 1 or self.groups.node is None:
            return padded[:frag.numel]
        out = padded.new_empty(topo.local_world_size * frag.shard_numel)
        _all_gather_flat(out, padded, group=self.groups.node)
        return out[:frag.numel]

    def _merge(self, index: int) -> None:
        pending = self.pending.pop(index)
        frag, st = self.fragments[index], self.state[index]
        device = self.params[0].device if self.params else self.backup_device
        values = pending.result().to(device)
        if pending.blocking:
            self.flat.assign(frag, values)
            st.synced_at = self.num_steps
        elif self.cfg.merge == "mix":
            self.flat.mix(frag, values, self.cfg.merge_alpha)
        else:
            self.flat.subtract(frag, values)

    def _worker(self) -> concurrent.futures.ThreadPoolExecutor:
        # One thread: the exchanges run in send order, the same on every rank, so their collectives match.
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-sync")
        return self._executor

    def _check_same_start(self) -> None:
        """Every node starts from the same weights (checksums over the cross group); ValueError naming the node."""
        topo = self.groups.topology
        if self.groups.cross is None or topo.num_nodes == 1:
            return
        sums = torch.zeros(2, dtype=torch.float64)
        for st in self.state:
            x = st.backup.to(torch.float64).cpu()
            sums += torch.stack([x.sum(), (x * torch.arange(1, x.numel() + 1, dtype=torch.float64)).sum()])
        rows = sums.new_empty(2 * topo.num_nodes)
        _all_gather_flat(rows, sums, group=self.groups.cross)
        rows = rows.view(topo.num_nodes, 2)
        for node in range(1, topo.num_nodes):
            if not torch.equal(rows[node], rows[0]):
                raise ValueError(f"DiLoCo: node {node} starts from other weights than node 0: initialise every rank "
                                 "from the same seed (or load the same weights) before DiLoCo is built")

    # -- checkpoints -------------------------------------------------------------------

    @property
    def _keeps_pending(self) -> bool:
        return self.delay > 0

    def state_dict(self) -> dict:
        """This rank's state (per rank: its shards): waits for exchanges in flight first. Tensors are the live ones."""
        self.wait()
        fragments = {}
        for frag, st in zip(self.fragments, self.state):
            entry = {"backup": st.backup, "synced_at": st.synced_at}
            if st.momentum is not None:
                entry["momentum"] = st.momentum
            if st.birder is not None:
                entry.update(m=st.birder.comp.m, b=st.birder.comp.b, birder_step=st.birder.comp.step)
            if self._keeps_pending:
                pending = self.pending.get(frag.index)
                entry["pending_step"] = pending.send_step if pending is not None else -1
                entry["pending_values"] = (pending.values if pending is not None
                                           else torch.zeros(frag.numel, device=self.backup_device))
            fragments[f"fragment{frag.index:04d}"] = entry
        return {"num_steps": self.num_steps, "fragments": fragments}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` of the same rank (same layout, same options)."""
        if self.pending:
            raise RuntimeError("DiLoCo.load_state_dict: exchanges are in flight; load before training")
        if len(state["fragments"]) != len(self.fragments):
            raise ValueError(f"DiLoCo state holds {len(state['fragments'])} fragments, this one has {len(self.fragments)}")
        self.num_steps = int(state["num_steps"])
        for frag, st in zip(self.fragments, self.state):
            entry = state["fragments"][f"fragment{frag.index:04d}"]
            if entry["backup"].numel() != st.backup.numel():
                raise ValueError(f"DiLoCo state: fragment {frag.index}'s shard holds {entry['backup'].numel()} "
                                 f"elements, this rank's {st.backup.numel()} (another node layout?)")
            st.backup.copy_(entry["backup"])
            st.synced_at = int(entry["synced_at"])
            if st.momentum is not None:
                st.momentum.copy_(entry["momentum"])
            if st.birder is not None:
                st.birder.comp.load_flat(entry["m"], entry["b"])
                st.birder.comp.step = int(entry["birder_step"])
            if self._keeps_pending and int(entry["pending_step"]) >= 0:
                send = int(entry["pending_step"])
                values = entry["pending_values"].to(self.backup_device, torch.float32).clone()
                self.pending[frag.index] = _Pending(send, send + self.delay, False, values=values)

    # -- life cycle --------------------------------------------------------------------

    def close(self) -> None:
        """Stop the sync thread (after the exchange it runs, if any)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> "DiLoCo":
        if self.inner_optimizer is None:
            raise ValueError("DiLoCo as a context manager needs inner_optimizer: its step() drives the schedule")
        self._hook = self.inner_optimizer.register_step_post_hook(lambda *args: self.step())
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()
        return False

    def summary(self) -> dict:
        """What the run used, for logs and summary.json."""
        topo = self.groups.topology
        return {
            "every": self.cfg.every, "fragments": len(self.fragments), "outer": self.cfg.outer,
            "outer_lr": self.cfg.outer_lr, "quantizer": self.cfg.quantizer, "streaming": self.cfg.streaming,
            "delay": self.delay, "merge": self.cfg.merge if self.delay else "replace",
            "form": resolve_form(self.cfg.form, topo.num_nodes), "num_nodes": topo.num_nodes,
            "ranks_per_node": topo.local_world_size,
            "payload_bits_per_element": (self.quantizer.bits_per_element(max(1, self.fragments[0].shard_len))
                                         if self.quantizer is not None else 1.0),
        }
