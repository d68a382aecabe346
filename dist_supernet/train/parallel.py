"""How the training application spreads one model over the ranks: DDP, or FSDP2 sharded inside each node.

``trainer.parallelism``:

- ``ddp``: every rank holds the whole model; ``DistributedDataParallel`` (with the compression's hook).
- ``hsdp``: FSDP2 ``fully_shard`` over the ranks of each node (mesh ``(replicate, shard)`` = nodes x
  ranks per node, from torchrun or ``compression.num_nodes``): each rank holds 1/L of the parameters,
  gradients and optimizer state. With ``compression=birder`` the shard mesh is 1-D and Birder's hook
  exchanges one bit per element across nodes (1-bit HSDP); with ``compression=none`` FSDP's native
  HSDP all-reduces the shards across nodes in full precision (the baseline).

Which submodules become FSDP units: the model's ``fsdp_units()`` if it has one (a transformer's
blocks), else its direct children that hold parameters; then the root. Each unit is one all-gather
and one reduce-scatter (and, for Birder, one 1-bit exchange) per step.

Evaluation, BN recalibration, the supernet search and export need the whole model on one rank:
:meth:`Parallel.eval_model` returns a plain replica refreshed from the shards (a collective).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_supernet.comm.stats import WireBytes, all_gather_bytes, all_reduce_bytes
from dist_supernet.train import distributed

log = logging.getLogger(__name__)

PARALLELISMS = ("ddp", "hsdp")


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules sharded as their own FSDP unit (the root is sharded last, over what is left).

    Example::
        >>> [type(m).__name__ for m in fsdp_units(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))]
        ['Linear', 'Linear']
    """
    units = getattr(model, "fsdp_units", None)
    if callable(units):
        return list(units())
    found = []
    for child in model.children():
        if not any(True for _ in child.parameters()):
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # containers have no forward of their own
            found += fsdp_units(child)
        else:
            found.append(child)
    return found


def _padded(params, per_node: int) -> int:
    """Elements of ``params`` with each dim 0 padded to a multiple of ``per_node`` (FSDP's layout)."""
    total = 0
    for p in params:
        rows = p.shape[0] if p.dim() else 1
        total += -(-rows // per_node) * per_node * (p.numel() // max(rows, 1))
    return total


class Parallel:
    """The model as the training step calls it, and what its parallelism needs around the step.

    Example::
        par = Parallel.wrap(model, "hsdp", device=torch.device("cpu"), num_nodes=2, native=False)
        with par.no_sync():                 # a micro-batch that only accumulates
            loss_fn(par.module(x)).backward()
    """

    def __init__(self, kind: str, module: nn.Module, model: nn.Module, mesh=None, replica: nn.Module | None = None,
                 units: list[tuple[int, bool]] | None = None, native: bool = False):
        self.kind = kind
        self.module = module  # what forward calls: the DDP wrapper or the FSDP root
        self.model = model  # the model itself (the FSDP root's parameters are sharded DTensors)
        self.mesh = mesh
        self.native = native
        self._replica = replica  # hsdp: a plain copy for evaluation, refreshed by eval_model()
        self._units = units or []  # hsdp: (padded elements, is the root) of each FSDP unit

    @classmethod
    def wrap(cls, model: nn.Module, kind: str, *, device: torch.device, num_nodes: int | None = None,
             native: bool = False, ddp_kwargs: dict | None = None) -> "Parallel":
        """``model`` (on ``device``) under ``kind``: ``ddp`` or ``hsdp`` (``native``: FSDP's own fp32 HSDP)."""
        if kind == "ddp":
            ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          **(ddp_kwargs or {}))
            return cls("ddp", ddp, model)
        if kind != "hsdp":
            raise ValueError(f"trainer.parallelism={kind!r}: expected one of {', '.join(PARALLELISMS)}")
        from torch.distributed.fsdp import fully_shard

        from dist_supernet.optim.fsdp import hsdp_mesh

        replica = copy.deepcopy(model)  # before sharding: the same architecture with plain tensors
        replica.requires_grad_(False)
        mesh = hsdp_mesh(device.type, num_nodes=num_nodes)
        shard_mesh = mesh if native else mesh["shard"]  # native: FSDP all-reduces across nodes itself
        per_node = mesh.mesh.shape[1]
        # Sizes first: fully_shard replaces each parameter by a new DTensor one.
        units, seen = [], set()
        for unit in fsdp_units(model):
            params = [p for p in unit.parameters() if id(p) not in seen]
            seen.update(map(id, params))
            units.append((unit, _padded(params, per_node), False))
        units.append((model, _padded([p for p in model.parameters() if id(p) not in seen], per_node), True))
        for unit, _, _ in units:
            fully_shard(unit, mesh=shard_mesh)
        units = [(padded, is_root) for _, padded, is_root in units]
        return cls("hsdp", model, model, mesh=mesh, replica=replica, units=units, native=native)

    def step_bytes(self, topology, *, passes: int, element_bytes: int = 4) -> WireBytes:
        """Bytes this rank sends in FSDP's own collectives in one step of ``passes`` forward/backward passes.

        The model (comm.stats' ring model): one reduce-scatter of each unit's gradient per step;
        all-gathers of its parameters in each forward and again in each backward (the root's stay
        gathered between them); native HSDP adds the fp32 all-reduce of each shard across nodes.
        Birder's exchange is counted by its engine. Zero for ddp.
        """
        wire = WireBytes()
        if self.kind != "hsdp":
            return wire
        node = topology.node_members(topology.node_rank)
        per_node = len(node)
        for padded, is_root in self._units:
            shard = padded // per_node * element_bytes
            gathers = passes * (1 if is_root else 2)
            wire += all_gather_bytes(shard, node, topology) * (gathers + 1)  # + 1: the reduce-scatter's share
            if self.native:
                wire += all_reduce_bytes(shard, topology.cross_members(topology.local_rank), topology)
        return wire

    def describe(self) -> str:
        """What runs where, for the start line."""
        if self.kind == "ddp":
            return "DDP (whole model on every rank)"
        nodes, per_node = self.mesh.mesh.shape
        return f"HSDP, FSDP2 mesh (replicate={nodes}, shard={per_node}): parameters sharded over each node's ranks"

    @contextlib.contextmanager
    def no_sync(self):
        """A micro-batch whose gradient is only accumulated locally (one exchange per optimizer step)."""
        if self.kind == "ddp":
            with self.module.no_sync():
                yield
            return
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def eval_model(self) -> nn.Module:
        """The whole model on this rank: the model itself (DDP), or the replica refreshed from the shards.

        A collective under hsdp (one all-gather per parameter inside the node): call on every rank.
        """
        if self.kind == "ddp":
            return self.model
        with torch.no_grad():
            for (name, p), q in zip(self.model.named_parameters(), self._replica.parameters()):
                q.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)
            for b, c in zip(self.model.buffers(), self._replica.buffers()):
                c.copy_(b.full_tensor() if hasattr(b, "full_tensor") else b)
        self._replica.train(self.model.training)
        return self._replica

    def replicas_in_sync(self) -> tuple[bool, str]:
        """Whether every rank holding the same part of the model holds the same bytes; and one digest.

        DDP: every rank's whole model. HSDP: each rank's shards against the ranks with the same shard
        on the other nodes (ranks of one node hold different shards). A collective.
        """
        digest = distributed.params_sha256(self.model)
        world = dist.get_world_size()
        gathered = [None] * world
        dist.all_gather_object(gathered, digest)
        if self.kind == "ddp":
            return len(set(gathered)) == 1, gathered[0]
        nodes, per_node = self.mesh.mesh.shape
        layout = self.mesh.mesh.tolist()
        in_sync = all(len({gathered[layout[n][s]] for n in range(nodes)}) == 1 for s in range(per_node))
        combined = hashlib.sha256("".join(gathered[r] for r in layout[0]).encode()).hexdigest()
        return in_sync, combined

