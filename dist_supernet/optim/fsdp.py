"""Birder on FSDP2: the FSDP adapter of the exchange engine (1-bit HSDP).

Legend: L ranks per node (the shard group), N nodes (replicas), D elements in an FSDP group's
reduce-scatter output on this rank, T elements of Birder's state on this rank.

Custom HSDP: the model is sharded with plain 1-D ``fully_shard`` over the ranks of one node
(``mesh["shard"]`` of :func:`hsdp_mesh`), so FSDP reduce-scatters each group's gradient inside the
node in full precision and runs no all-reduce; the 1-bit exchange across nodes runs in
``FSDPModule.set_all_reduce_hook``. Per FSDP parameter group, after its reduce-scatter, the hook gets
this rank's flat shard of the group's gradient, the node average, laid out by FSDP as::

    for each parameter of the group that takes part (FSDP's order):
        its dim-0 shard: ceil(dim0 / L) rows on every rank (rows past dim0 are zero padding,
        so the last ranks' shards are partly or wholly padding: uneven and empty shards)

This adapter maps that buffer to a chunk of canonical elements: each parameter's real rows are
one segment, indexed by where this rank's m and b of that parameter live; its padding rows are a
second segment with ``used = 0`` (never updated, never moved), indexed into a small scratch region
of m and b shared by all padding. The :class:`~dist_supernet.optim.engine.ExchangeEngine` then
compresses it (m, b of this rank's shard only: 8 bytes per parameter / L), exchanges one bit per
element with the ranks holding the same shard on the other nodes (the replica group: one rank per
node), and keeps the packed result for :meth:`Birder.step`, which applies it to the local shards
in one fused pass per FSDP group. The flags of the step (non-finite, piece size) are agreed by
every rank of the job.

What FSDP does around the hook, and how it is met (the traps):

- ``.grad`` after backward is FSDP's sharded DTensor gradient, the node average (the hook leaves
  the buffer as it is), so clipping and GradScaler see real gradients. A NaN/Inf on any rank:
  every rank skips the step; a rank whose gradient was finite gets a NaN in one ``.grad`` element
  at the end of backward (an autograd final callback), so GradScaler backs off alike everywhere.
- ``reduce_dtype`` (mixed precision): the buffer is in the reduce dtype and FSDP casts it into a
  new ``.grad`` after the hook, so nothing is written into the buffer after the hook returns (the
  end-of-backward NaN goes into ``.grad`` itself).
- Divide factors: with an fp16 ``reduce_dtype`` or forced SUM reductions FSDP divides the buffer
  again after the hook, in place; the hook then compresses ``buffer / factor`` (the node average)
  from a copy.
- Accumulation: ``set_requires_gradient_sync(False)`` on all but the last micro-batch: FSDP reduces
  once, the hook runs once per step. FSDP adds into an existing ``.grad`` after the hook.
- Parameters without a gradient: ``attach`` turns on FSDP's ``set_reduce_scatter_unused_params`` so
  the buffer layout does not depend on which parameters got one; ``track_unused=True`` (like DDP's
  ``find_unused_parameters``) OR-reduces per-parameter "got a gradient" flags over all ranks before
  each group's compress, and parameters no rank computed a gradient for do not move and keep m, b.
  Frozen parameters (``requires_grad=False``) are never in the buffer. Supernet slices: the grad mask.
- Only ``Shard(0)`` placements and one parameter group per FSDP module (FSDP refuses the hook
  otherwise); native 2-D HSDP is refused (FSDP all-reduces across replicas in full precision first).

Random draws: seeded by the global rank (independent across replicas and shards, reproducible);
requantising collectives key theirs by the step. With one node (no replica dimension) the hook
still runs: Birder runs on each rank's shard with no exchange, and the ranks agree on skips.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
from torch.autograd import Variable

from dist_supernet.comm import CommGroups, Topology
from dist_supernet.comm.collectives import ALLGATHER_MAX_RANKS, resolve_collective
from dist_supernet.optim.compressor import BirderCompressor, Chunk, local
from dist_supernet.optim.engine import ExchangeEngine, poison_where_others_failed

log = logging.getLogger(__name__)

MESH_DIMS = ("replicate", "shard")


def is_fsdp_module(module) -> bool:
    """True for a module that ``fully_shard`` was applied to (an ``FSDPModule``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def is_dtensor(tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "placements") and hasattr(tensor, "to_local")


def hsdp_mesh(device_type: str | None = None, *, num_nodes: int | None = None):
    """The 2-D device mesh ``(replicate, shard)``: nodes x ranks per node, from torchrun's environment.

    ``num_nodes`` overrides the node count (LOCAL_WORLD_SIZE otherwise), so that one machine can
    pretend to be several nodes. Shard with ``fully_shard(module, mesh=mesh["shard"])`` and hand
    the whole mesh to :meth:`Birder.attach`. A collective call (every rank).

    Example::
        mesh = hsdp_mesh("cuda")                               # e.g. 4 nodes x 8 GPUs: (4, 8)
        for block in model.blocks:
            fully_shard(block, mesh=mesh["shard"])             # was: mesh=mesh (native HSDP)
        fully_shard(model, mesh=mesh["shard"])
    """
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    topology = Topology.from_env(num_nodes)
    return init_device_mesh(device_type, (topology.num_nodes, topology.local_world_size), mesh_dim_names=MESH_DIMS)


def _mesh_layout(mesh) -> tuple[list[list[int]], int, int]:
    """``(replica_groups, num_nodes, local)`` of a 1-D (one node) or 2-D ``(replicate, shard)`` mesh:
    ``replica_groups[l]`` = the global ranks holding shard ``l``, one per node."""
    ranks = mesh.mesh
    if ranks.ndim == 1:
        ranks = ranks.view(1, -1)
    if ranks.ndim != 2:
        raise ValueError(f"mesh: expected a 1-D (shard) or 2-D (replicate, shard) device mesh, got {ranks.ndim}-D")
    num_nodes, per_node = ranks.shape
    return [ranks[:, l].tolist() for l in range(per_node)], num_nodes, per_node


def _fsdp_groups(module):
    """The FSDP parameter groups of one FSDPModule (FSDP2 internals, checked here in one place)."""
    state = module._get_fsdp_state()
    return list(getattr(state, "_fsdp_param_groups", []))


def _shard_size(param) -> int:
    """How many ranks share ``param`` along its Shard(0) placement (1 for a plain tensor)."""
    if not is_dtensor(param):
        return 1
    size = 1
    for dim, placement in enumerate(param.placements):
        if getattr(placement, "dim", None) is not None:
            if placement.dim != 0:
                raise ValueError(f"Birder: a parameter of shape {tuple(param.shape)} is sharded as {placement}; "
                                 "Birder on FSDP2 takes Shard(0) placements only (fully_shard's default)")
            size *= param.device_mesh.size(dim)
    return size


def _shard_coordinate(param) -> int:
    """This rank's index along ``param``'s shard dimension (0 for a plain tensor)."""
    if not is_dtensor(param):
        return 0
    for dim, placement in enumerate(param.placements):
        if getattr(placement, "dim", None) is not None:
            return param.device_mesh.get_local_rank(dim)
    return 0


def padded_local_numel(param) -> int:
    """Elements of ``param``'s padded dim-0 shard on every rank: ceil(dim0 / L) rows (FSDP's layout)."""
    shards = _shard_size(param)
    if param.dim() == 0:
        return param.numel()
    rows = -(-param.shape[0] // shards)
    return rows * (param.numel() // max(param.shape[0], 1)) if param.shape[0] else 0


@dataclasses.dataclass
class _Member:
    """One parameter of an FSDP group in the hook's buffer: where its rows go."""

    param: torch.nn.Parameter
    padded: int  # elements of this rank's padded shard in the buffer
    fsdp_param: object


class BirderFSDPState(ExchangeEngine):
    """The exchange engine over FSDP2-sharded parameters (Birder's state for this rank's shards only).

    Hyperparameters: as :class:`~dist_supernet.optim.hook.BirderState` (``beta``, ``amsgrad``,
    ``seed``, ``skip_nonfinite``, ``piece_numel``, ``track_unused``) and the 1-bit ``collective`` of
    the replica exchange (``auto``: ``allgather`` up to 4 nodes, the 1-bit reduce-scatter form
    beyond: about 2 bits per parameter per node at any node count).
    Per-element state: m, b for this rank's local shard of each parameter (8 bytes per parameter
    / L) plus one scratch region for padding (the largest padding of any parameter).
    Per-step state: the engine's round; the grad mask (over this rank's shards).

    Built by :meth:`Birder.__init__` for DTensor parameters and connected by :meth:`Birder.attach`.
    """

    def __init__(self, params, *, beta: float = 0.9, amsgrad: bool = False, seed: int = 0,
                 skip_nonfinite: bool = True, piece_numel: int | None = None, track_unused: bool = False,
                 beta2: float | None = None, normalizer: str = "abs", grad_clip: float | None = None):
        if grad_clip is not None:
            raise ValueError(f"grad_clip={grad_clip!r}: Birder's per-rank clipping is not supported under FSDP2 "
                             "yet (each rank holds a shard of its node's gradient); use DDP, or grad_clip=None")
        params = list(params)
        pads = [padded_local_numel(p) - local(p).numel() for p in params]
        device = local(params[0]).device if params else torch.device("cpu")
        # One region of m, b for all padding (pad segments never update it: used = 0).
        self.scratch = torch.zeros(max(pads, default=0), device=device)
        compressor = BirderCompressor(params + [self.scratch], beta=beta, amsgrad=amsgrad, seed=seed, beta2=beta2,
                                      normalizer=normalizer)
        super().__init__(compressor, skip_nonfinite=skip_nonfinite, piece_numel=piece_numel)
        # Before attach: Birder runs locally on .grad; every replica of a shard draws the same bits.
        compressor.rank_for_draws = _shard_coordinate(params[0]) if params else 0
        self.track_unused = bool(track_unused)
        self.attached = False
        self.superseded_by = None
        self.num_nodes = 1
        self._layouts = {}  # FSDP group -> list of _Member (the group's parameters, FSDP's order)
        self._chunks = {}  # (group, included) -> (Chunk, used_P without tracking)
        self._had_grad = {}  # FSDP group -> {fsdp_param: got a gradient on this rank}, set in post_backward
        self._callback_queued = False
        self._modules = []
        self._module_params = []  # the attached model's parameters(), the grad mask's order

    # -- set-up -------------------------------------------------------------------------

    @property
    def params(self):
        return self.compressor.params[:-1]  # without the scratch

    def connect_mesh(self, mesh=None, collective: str = "auto", *, num_nodes: int | None = None,
                     requantize: bool = False, inter_node: str = "auto", timeout_s: float | None = None) -> None:
        """Create the replica and flag groups (a collective call: every rank, same order).

        ``mesh``: a 2-D ``(replicate, shard)`` DeviceMesh (:func:`hsdp_mesh`) or a 1-D one (one node);
        None: nodes x ranks per node from torchrun's environment (``num_nodes`` overrides the node count).
        Every parameter must be sharded over exactly the ranks of its node (``mesh["shard"]``).
        """
        world, rank = dist.get_world_size(), dist.get_rank()
        if mesh is not None:
            replica_groups, num_nodes, per_node = _mesh_layout(mesh)
        else:
            topo = Topology.from_env(num_nodes)
            num_nodes, per_node = topo.num_nodes, topo.local_world_size
            replica_groups = [topo.cross_members(l) for l in range(per_node)]
        if num_nodes * per_node != world:
            raise ValueError(f"mesh: {num_nodes} x {per_node} ranks, the job has {world}")
        shard = next(l for l, members in enumerate(replica_groups) if rank in members)
        replica_rank = replica_groups[shard].index(rank)
        node_ranks = sorted(members[replica_rank] for members in replica_groups)
        for p in self.params:
            sharded_over = sorted(p.device_mesh.mesh.flatten().tolist()) if is_dtensor(p) else [rank]
            if sharded_over != node_ranks:
                raise ValueError(
                    f"Birder.attach: a parameter of shape {tuple(p.shape)} is sharded over ranks {sharded_over}, "
                    f"but this rank's node holds ranks {node_ranks} ({num_nodes} node(s) x {per_node}); shard with "
                    "fully_shard(module, mesh=mesh['shard']) of the mesh given to attach (or set num_nodes)")
        kwargs = {}
        if timeout_s is not None:
            from datetime import timedelta

            kwargs["timeout"] = timedelta(seconds=float(timeout_s))
        replica_group = None
        if num_nodes > 1:
            replica_group, _ = dist.new_subgroups_by_enumeration(replica_groups, **kwargs)
        flag_group = dist.new_group(list(range(world)), **kwargs) if world > 1 else None
        # The replica exchange: one rank per node, every peer across a node boundary.
        replicas = Topology(world_size=num_nodes, rank=replica_rank, local_world_size=1)
        if collective == "auto":
            name = "allgather" if num_nodes <= ALLGATHER_MAX_RANKS else "hierarchical"
        else:
            name = resolve_collective(collective, replicas)
        groups = CommGroups(world=replica_group, node=None, cross=replica_group)
        self.compressor.connect(name, requantize=requantize, inter_node=inter_node, topology=replicas,
                                groups=groups, draw_rank=rank)
        self._flag_group = (Topology(world_size=world, rank=rank, local_world_size=per_node), flag_group)
        self.num_nodes = num_nodes

    def attach_modules(self, model) -> None:
        """Register the all-reduce hook on every FSDP module of ``model`` (after :meth:`connect_mesh`)."""
        modules = [m for m in model.modules() if is_fsdp_module(m)]
        if not modules:
            raise ValueError("Birder.attach: the model has no FSDP2 module: apply fully_shard(...) first")
        owned = set(map(id, self.params))
        device = self.compressor.device
        stream = None
        if device.type == "cuda":
            stream = self._pipeline.stream(device)  # the hook's work: on its own stream, overlapping FSDP's
        for module in modules:
            groups = _fsdp_groups(module)
            if len(groups) > 1:
                raise ValueError(f"Birder.attach: FSDP module {type(module).__name__} has {len(groups)} parameter "
                                 "groups (a per-parameter mesh); FSDP's all-reduce hook takes one group per module")
            for group in groups:
                if getattr(group, "_is_hsdp", False):
                    raise ValueError(
                        "Birder.attach: the model is sharded with native HSDP (a 2-D mesh in fully_shard): FSDP "
                        "all-reduces gradients across nodes in full precision before any hook. Shard with "
                        "fully_shard(module, mesh=mesh['shard']) and pass the 2-D mesh to attach")
                members = []
                for fsdp_param in group.fsdp_params:
                    param = fsdp_param.sharded_param
                    if id(param) not in owned:
                        raise ValueError("Birder.attach: an FSDP parameter is in no parameter group of this optimizer "
                                         f"(shape {tuple(param.shape)}); build Birder from model.parameters()")
                    padded = int(torch.Size(fsdp_param.padded_sharded_param_size).numel())
                    if padded - local(param).numel() > self.scratch.numel():
                        raise RuntimeError("Birder: FSDP pads a shard more than expected (torch changed its layout)")
                    members.append(_Member(param, padded, fsdp_param))
                self._layouts[group] = members
                self._wrap_post_backward(group)
            if hasattr(module, "set_reduce_scatter_unused_params"):
                # The buffer then holds every parameter that requires grad, whichever got one.
                module.set_reduce_scatter_unused_params(True, recurse=False)
            hook = self._make_hook(groups[0]) if groups else None
            if hook is not None:
                module.set_all_reduce_hook(hook, **({"stream": stream} if stream is not None else {}))
        self._modules = modules
        self._module_params = list(model.parameters())
        self.attached = True

    def _wrap_post_backward(self, group) -> None:
        """Note which parameters got a gradient on this rank before FSDP reduces (and forgets it)."""
        original = group.post_backward
        had_grad = self._had_grad

        def post_backward(*args, **kwargs):
            had_grad[group] = {fp: (getattr(fp, "unsharded_accumulated_grad", None) is not None
                                    or (hasattr(fp, "_unsharded_param") and fp._unsharded_param.grad is not None))
                               for fp in group.fsdp_params}
            return original(*args, **kwargs)

        group.post_backward = post_backward

    # -- the hook ------------------------------------------------------------------------

    def _make_hook(self, group):
        def birder_fsdp_hook(reduce_output: torch.Tensor) -> None:
            self.exchange_group(group, reduce_output)

        return birder_fsdp_hook

    def _included(self, group) -> list:
        """The group's parameters in this reduce-scatter, as FSDP decides (a gradient, or unused params on)."""
        had = self._had_grad.get(group, {})
        unused_too = getattr(group, "reduce_scatter_unused_params", False)
        return [m for m in self._layouts[group]
                if had.get(m.fsdp_param, False)
                or (unused_too and hasattr(m.fsdp_param, "_unsharded_param") and m.param.requires_grad)]

    def chunk_of(self, group, members) -> tuple[Chunk, torch.Tensor]:
        """The chunk of ``members`` (a group's parameters in one reduce-scatter) and their static used flags."""
        key = (group, tuple(id(m.param) for m in members))
        cached = self._chunks.get(key)
        if cached is not None:
            return cached
        comp = self.compressor
        params, ranges, starts, canon, used = [], [], [0], [], []
        for m in members:
            real = local(m.param).numel()
            for tensor, n, c, u in ((m.param, real, comp.offset[m.param], 1),
                                    (self.scratch, m.padded - real, comp.offset[self.scratch], 0)):
                params.append(tensor)
                ranges.append((0, n))
                starts.append(starts[-1] + n)
                canon.append(c)
                used.append(u)
        device = comp.device
        chunk = Chunk(
            params=tuple(params),
            positions=torch.tensor([comp.position[p] for p in params], dtype=torch.int64, device=device),
            seg_starts=torch.tensor(starts, dtype=torch.int64, device=device),
            seg_canon=torch.tensor(canon, dtype=torch.int64, device=device),
            numel=starts[-1], param_ranges=tuple(ranges),
        )
        cached = (chunk, torch.tensor(used, dtype=torch.uint8, device=device))
        self._chunks[key] = cached
        return cached

    def exchange_group(self, group, reduce_output: torch.Tensor) -> None:
        """The all-reduce hook of one FSDP group: map its reduce-scatter output to a chunk, submit it."""
        members = self._included(group)
        chunk, static_used = self.chunk_of(group, members)
        if chunk.numel != reduce_output.numel():
            raise RuntimeError(
                f"Birder: FSDP's reduce-scatter output holds {reduce_output.numel()} elements, the layout of its "
                f"{len(members)} parameters {chunk.numel} (torch {torch.__version__} changed FSDP2's buffer layout?)")
        used_P, reduce_used = static_used, False
        if self.track_unused:
            had = self._had_grad.get(group, {})
            flags = [had.get(m.fsdp_param, False) for m in members]
            used_P = static_used.clone()
            used_P[0::2] = torch.tensor(flags, dtype=torch.uint8, device=used_P.device)
            reduce_used = True
        grad_D = reduce_output
        if reduce_output.is_cuda:
            # The buffer was allocated on FSDP's reduce-scatter stream; with a reduce dtype FSDP casts it into a
            # new .grad and drops it right after this hook, while our kernels on this stream may still read it.
            reduce_output.record_stream(torch.cuda.current_stream(reduce_output.device))
        factor = _postdivide_factor(group, reduce_output)
        if factor is not None:
            grad_D = reduce_output / factor  # the node average, and a copy FSDP's in-place divide cannot touch
        self.submit(grad_D, chunk, used_P=used_P, reduce_used=reduce_used, inline=grad_D.is_cuda)
        if not self._callback_queued:
            self._callback_queued = True
            Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        """After FSDP's own end of backward: wait for the exchanges, agree on the flags, mark non-finite."""
        self._callback_queued = False
        device = self.compressor.device
        if device.type == "cuda":
            torch.cuda.current_stream(device).wait_stream(self._pipeline.stream(device))
        round_ = self.finish(inline=device.type == "cuda")
        if round_ is None or round_.nonfinite_ranks is None:
            return
        for param in self._module_params:
            grad = param.grad
            if grad is not None and local(grad).numel():
                poison_where_others_failed(local(grad), round_)
                break

    # -- masks -------------------------------------------------------------------------

    def set_grad_mask(self, masks) -> None:
        """Elements that may move in the coming step (True) — the rest keep x, m and b.

        ``masks``: None, a bool tensor over all parameters (full, unsharded shapes) in the attached
        model's ``parameters()`` order, or ``{param: bool tensor of its full shape}``. Each rank keeps
        the rows of its own shard. Must be identical on every rank (from the sampled architecture).
        """
        comp = self.compressor
        if masks is None:
            self.canonical_mask = None
            return
        params = self._module_params or self.params
        if isinstance(masks, torch.Tensor):
            total = sum(p.numel() for p in params)
            if masks.numel() != total:
                raise ValueError(f"set_grad_mask: a mask of {masks.numel()} elements, the model has {total}")
            flat_masks, start = {}, 0
            for p in params:
                flat_masks[p] = masks.reshape(-1)[start : start + p.numel()]
                start += p.numel()
            masks = flat_masks
        flat = torch.ones(comp.numel_total, dtype=torch.bool, device=comp.device)
        flat[comp.offset[self.scratch]:] = False
        for p, mask in masks.items():
            if p not in comp.offset:
                raise ValueError("set_grad_mask: a masked parameter is not managed by this Birder state")
            rows = _local_rows(p, mask.reshape(p.shape))
            start = comp.offset[p]
            flat[start : start + rows.numel()] = rows.reshape(-1).to(comp.device, torch.bool)
        self.canonical_mask = flat

    # -- checkpoints -----------------------------------------------------------------------

    def replica_index(self) -> int:
        return self.compressor.topology.rank if self.attached else 0

    def sharded_state(self) -> dict:
        """``{param_index: {"m", "b"}}`` as DTensors shaped and sharded like each parameter (views of the
        live state): saved under a key per replica, they reshard on load to any shard count."""
        from torch.distributed.tensor import DTensor

        out = {}
        for i, p in enumerate(self.params):
            views = self.compressor.views(p)
            if is_dtensor(p):
                out[str(i)] = {k: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                                run_check=False) for k, v in views.items()}
            else:
                out[str(i)] = views
        return out

    def close(self) -> None:
        super().close()
        self._modules, self._layouts, self._chunks = [], {}, {}


def _local_rows(param, full: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (shaped like the whole parameter) that this rank's shard of ``param`` holds."""
    if not is_dtensor(param) or param.dim() == 0:
        return full
    shards, coordinate = _shard_size(param), _shard_coordinate(param)
    rows = -(-param.shape[0] // shards)
    return full[coordinate * rows : min((coordinate + 1) * rows, param.shape[0])]


def _postdivide_factor(group, reduce_output) -> float | None:
    """The factor FSDP divides the hook's buffer by after the hook (None: it does not divide)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_gradient_divide_factors
    except ImportError:
        return None
    rs_group = getattr(group, "_reduce_scatter_process_group", None)
    args = (rs_group, None, reduce_output.dtype, reduce_output.device.type,
            getattr(group, "gradient_divide_factor", None), getattr(group, "force_sum_reduction_for_comms", False))
    for n in (6, 5, 4):  # the signature grew over torch releases
        try:
            factors = _get_gradient_divide_factors(*args[:n])
            return factors[1]
        except TypeError:
            continue
    return None


def fsdp_world_note(num_nodes: int) -> str:
    """One line saying what runs where (for logs)."""
    if num_nodes == 1:
        return ("FSDP over one node (no replica dimension): Birder runs on each rank's shard of the "
                "reduce-scattered gradient, no 1-bit exchange")
    return f"HSDP: full precision inside each node, 1 bit per element across {num_nodes} nodes"


__all__ = ["BirderFSDPState", "hsdp_mesh", "is_dtensor", "is_fsdp_module", "padded_local_numel"]
