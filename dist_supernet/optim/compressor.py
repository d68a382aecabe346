"""Birder's transport-neutral compressor: m and b by canonical index, compress -> 1-bit collective -> packed result.

Legend: T elements in the model, D elements in a chunk (a DDP bucket), P parameters in a chunk.

The compressor knows nothing of DDP. It owns Birder's only persistent state,
fp32 ``m`` and ``b`` for every element in canonical order (the order of its
parameter list, each parameter flattened; 8 bytes per parameter, like AdamW),
and runs one chunk of parameters at a time: the fused compress kernel (update
m, b where the gradient is finite and the element active, draw one bit per
element), then the 1-bit collective, returning the collective's packed result
for the optimizer to decode straight into the update.

A chunk is described by a small index map, not by a per-element index: for
each of its P parameters its chunk-local start and its canonical offset
(``seg_starts`` int64 [P+1], ``seg_canon`` int64 [P]). The kernels derive each
element's canonical index from it, so the random draws, m and b do not depend
on how DDP groups parameters into buckets (DDP rebuilds its buckets after the
first iteration and on every resume), and there is no 2**31 cap.
"""

import dataclasses
import math

import torch

from dist_supernet import kernels
from dist_supernet.comm import CommGroups, CommStats, Topology, WireBytes, build_collective, mix_seed
from dist_supernet.comm.collectives import COLLECTIVES, Packed, chunk_elems, resolve_collective

STAGE_COMPRESS = 0
# Rank stand-in for the seed when every rank must draw the same bits (Birder
# applied to an already averaged gradient, no 1-bit exchange).
SHARED_DRAW_RANK = -1


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a DTensor's local shard (FSDP2), any other tensor itself.

    Birder's state and update are per element of what this rank holds: for a parameter sharded by
    FSDP2 that is its local shard (``to_local()``: under no_grad, the live storage FSDP all-gathers
    from), looked up anew each time (FSDP may re-pad it at its lazy init or after ``load_state_dict``).
    """
    to_local = getattr(tensor, "to_local", None)
    if to_local is None:
        return tensor
    with torch.no_grad():
        return to_local()


def memory_perm(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """Dimension order in which ``tensor``'s elements lie in memory, if it is dense and non-overlapping.

    DDP lays a dense parameter's gradient into its bucket in the parameter's memory order (e.g. NHWC
    for channels_last), so that is the order of the parameter's elements in a chunk and in m, b.
    None for a layout with gaps or overlaps (DDP then uses the logical order).

    Example::
        >>> memory_perm(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))
        (0, 2, 3, 1)
    """
    perm = tuple(sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), -tensor.shape[d])))
    expected = 1
    for d in reversed(perm):
        if tensor.shape[d] != 1 and tensor.stride(d) != expected:
            return None
        expected *= tensor.shape[d]
    return perm


def flat_like_memory(values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``values`` (shaped like ``param``, any layout) flattened in ``param``'s chunk order (see memory_perm)."""
    if param.is_contiguous():
        return values.reshape(-1)
    perm = memory_perm(param)
    if perm is None:
        return values.reshape(-1)
    return values.permute(perm).reshape(-1)


def flat_view(param: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``param``'s (local) elements in chunk order (its memory, for a dense layout); else ``param``."""
    param = local(param)
    if param.is_contiguous():
        return param.view(-1)
    if memory_perm(param) is not None:
        return param.as_strided((param.numel(),), (1,))
    return param  # gaps or overlaps: the kernels take it in logical order


def piece_bounds(numel: int, piece_numel: int) -> list:
    """``[(lo, hi), ...]``: ``[0, numel)`` in ceil(numel / piece_numel) near-equal pieces, each starting
    at a multiple of 8 elements.

    Example::
        >>> piece_bounds(100, 32)
        [(0, 32), (32, 64), (64, 96), (96, 100)]
        >>> piece_bounds(100, 40)
        [(0, 40), (40, 80), (80, 100)]
    """
    size = chunk_elems(numel, -(-numel // piece_numel))
    return [(lo, min(lo + size, numel)) for lo in range(0, numel, size)]


@dataclasses.dataclass
class Chunk:
    """A flat run of parameters (a DDP bucket, or all parameters in local mode) and its index map."""

    params: tuple
    positions: torch.Tensor  # int64 [P]: each parameter's position in the compressor's list
    seg_starts: torch.Tensor  # int64 [P+1]: chunk-local start of each parameter
    seg_canon: torch.Tensor  # int64 [P]: canonical index of each parameter's first element in the chunk
    numel: int
    # A piece of a larger chunk (see BirderCompressor.split): where it starts in that chunk and which of
    # that chunk's parameters it holds. param_ranges: (first element, count) of each tensor's flat view
    # that the chunk holds (None: whole tensors); set for pieces and for chunks of parts of tensors (FSDP).
    start: int = 0
    parent_params: slice | None = None
    param_ranges: tuple | None = None
    pieces: dict = dataclasses.field(default_factory=dict, repr=False)  # piece_numel -> tuple of Chunks

    @property
    def index_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.seg_starts, self.seg_canon

    def param_views(self) -> list:
        """The chunk's part of each parameter as a flat view in chunk order (what the decode writes)."""
        views = [flat_view(p) for p in self.params]
        if self.param_ranges is None:
            return views
        return [v[first : first + n] for v, (first, n) in zip(views, self.param_ranges)]


NORMALIZERS = ("abs", "rms")


def check_rule(beta, beta2=None, normalizer: str = "abs", grad_clip=None) -> None:
    """One ValueError naming the first bad hyperparameter of the update rule."""
    for name, value in (("beta", beta), ("beta2", beta2)) if beta2 is not None else (("beta", beta),):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r}: must be in [0, 1)")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer={normalizer!r}: must be one of {', '.join(NORMALIZERS)}")
    if grad_clip is not None and (isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float))
                                  or not 0 < grad_clip < float("inf")):
        raise ValueError(f"grad_clip={grad_clip!r}: must be > 0 (the largest gradient norm of a rank), or None")


class BirderCompressor:
    """m, b and the 1-bit exchange of any flat chunk of ``params``.

    Hyperparameters: ``beta`` (EMA factor of m and b), ``amsgrad`` (b = max(b_prev, b)),
    ``seed`` (base of every random draw), ``normalizer`` (``"abs"``: b is the EMA of |g|, the
    paper's rule; ``"rms"``: b is the EMA of g², r = m̂ / sqrt(b̂), Adam's bias-corrected
    second moment), ``beta2`` (EMA factor of b; None: ``beta``) and ``grad_clip`` (this rank's
    gradient enters m and b scaled to norm ``grad_clip`` when larger: AdamW's clipping, per worker).
    Per-element state: ``m``, ``b`` (fp32 [T], canonical order). Stats: ``stats`` (bytes on the wire, exchanges).

    ``connect()`` attaches a 1-bit collective (a collective call on every rank,
    it creates the process groups); without one, every rank draws the same bits
    (local mode: the gradient is already the same everywhere).

    Example::
        comp = BirderCompressor(list(model.parameters()), beta=0.9)
        comp.connect("two_phase")                       # on every rank
        chunk = comp.chunk(list(model.parameters()))
        flag = torch.zeros(1, dtype=torch.uint8)
        packed = comp.exchange(flat_grad, chunk, flag=flag)   # a Packed result, same on every rank
    """

    def __init__(self, params, *, beta: float = 0.9, amsgrad: bool = False, seed: int = 0,
                 beta2: float | None = None, normalizer: str = "abs", grad_clip: float | None = None):
        check_rule(beta, beta2, normalizer, grad_clip)
        # hyperparameters
        self.beta = float(beta)
        self.beta2 = self.beta if beta2 is None else float(beta2)
        self.normalizer = normalizer
        self.clip = None if grad_clip is None else float(grad_clip)
        self.g_scale = 1.0  # this step's min(1, clip / ||g||) of this rank's gradient (grad_clip)
        self.last_grad_norm = None  # this rank's gradient norm of the last clipped step
        self.amsgrad = bool(amsgrad)
        self.seed = int(seed)
        self.collective = None
        self.collective_name = None
        self.topology = Topology.from_env()
        self.groups = None
        self.rank_for_draws = None  # None: the collective's rank (see draw_rank)
        # per-element state, canonical order
        self.params = list(params)
        if len(set(map(id, self.params))) != len(self.params):
            raise ValueError("Birder: a parameter appears twice in the parameter list")
        self.position = {p: i for i, p in enumerate(self.params)}
        self.offset = {}
        total = 0
        for p in self.params:
            self.offset[p] = total
            total += local(p).numel()  # a DTensor (FSDP2): this rank's shard only
        self.numel_total = total
        device = local(self.params[0]).device if self.params else torch.device("cpu")
        self.device = device
        self.m = torch.zeros(total, dtype=torch.float32, device=device)
        self.b = torch.zeros(total, dtype=torch.float32, device=device)
        self.step = 0
        self._chunks = {}
        # stats
        self.stats = CommStats()

    # -- set-up ------------------------------------------------------------------------

    def connect(self, collective: str = "auto", *, requantize: bool = False, num_nodes: int | None = None,
                timeout_s: float | None = None, inter_node: str = "auto", topology: Topology | None = None,
                groups: CommGroups | None = None, draw_rank: int | None = None) -> None:
        """Attach the 1-bit ``collective`` (``auto``: see ``comm.collectives.resolve_collective``).

        A collective call: every rank, same order (it creates the process groups). ``topology`` and
        ``groups``: the ranks that exchange and their groups, made by the caller (FSDP2: the replicas
        of one shard); default: every rank, by torchrun's node layout (or ``num_nodes``).
        ``draw_rank``: the rank that seeds this rank's draws (default: its rank in ``topology``).
        """
        if self.collective is not None:
            raise RuntimeError("Birder: the compressor is already connected to a collective")
        topology = topology or Topology.from_env(num_nodes)
        name = resolve_collective(collective, topology)
        if groups is None:
            groups = CommGroups.create(topology, hierarchical=COLLECTIVES[name].needs_node_groups,
                                       timeout_s=timeout_s)
        self.topology, self.groups = topology, groups
        self.rank_for_draws = draw_rank
        self.collective = build_collective(name, topology, groups, requantize=requantize, inter_node=inter_node)
        self.collective_name = name

    @property
    def draw_rank(self) -> int:
        if self.rank_for_draws is not None:
            return self.rank_for_draws
        return self.topology.rank if self.collective is not None else SHARED_DRAW_RANK

    def step_seed(self, stage: int = STAGE_COMPRESS) -> int:
        return mix_seed(self.seed, self.draw_rank, self.step, stage)

    def chunk(self, params) -> Chunk:
        """The chunk of ``params`` in this order (cached: DDP's buckets repeat every step)."""
        key = tuple(map(id, params))
        chunk = self._chunks.get(key)
        if chunk is not None:
            return chunk
        for p in params:
            if p not in self.offset:
                raise ValueError("a DDP bucket holds a parameter that this Birder state does not manage")
        numels = [local(p).numel() for p in params]
        device = self.device if self.device.type != "meta" else torch.device("cpu")  # tables need values
        starts = [0]
        for n in numels:
            starts.append(starts[-1] + n)
        chunk = Chunk(
            params=tuple(params),
            positions=torch.tensor([self.position[p] for p in params], dtype=torch.int64, device=device),
            seg_starts=torch.tensor(starts, dtype=torch.int64, device=device),
            seg_canon=torch.tensor([self.offset[p] for p in params], dtype=torch.int64, device=device),
            numel=starts[-1],
        )
        # Chunks that share a parameter with this one are stale (DDP rebuilt its buckets); the state
        # is by canonical index, so nothing needs moving.
        members = set(key)
        for other in [k for k in self._chunks if members.intersection(k)]:
            del self._chunks[other]
        self._chunks[key] = chunk
        return chunk

    def split(self, chunk: Chunk, piece_numel: int) -> tuple:
        """``chunk`` as consecutive pieces of at most about ``piece_numel`` elements (cached per chunk).

        Pieces start at multiples of 8 elements, so their packed bits are byte-aligned slices of the
        chunk's: compressing and reducing piece by piece gives the chunk's bits, counts and update
        exactly (the draws are keyed by canonical index). Why pieces: the hook compresses piece k + 1
        while piece k is on the wire. A chunk holding a parameter with gaps in memory (no flat view)
        stays whole.
        """
        if chunk.numel <= piece_numel or chunk.parent_params is not None:  # small, or a piece already
            return (chunk,)
        key = piece_numel
        cached = chunk.pieces.get(key)
        if cached is not None:
            return cached
        if any(not local(p).is_contiguous() and memory_perm(local(p)) is None for p in chunk.params):
            chunk.pieces[key] = (chunk,)
            return chunk.pieces[key]
        starts, canon = chunk.seg_starts.tolist(), chunk.seg_canon.tolist()
        # Where each segment starts in its tensor's flat view (segments of a chunk may be parts of tensors).
        base = [first for first, _ in chunk.param_ranges] if chunk.param_ranges else [0] * len(chunk.params)
        device = chunk.seg_starts.device
        pieces = []
        for lo, hi in piece_bounds(chunk.numel, piece_numel):
            # The parameters with elements in [lo, hi); an empty one goes with the piece its start is in.
            members = [s for s in range(len(chunk.params))
                       if (starts[s] < hi and starts[s + 1] > lo)
                       or (starts[s] == starts[s + 1] and lo <= starts[s] and (starts[s] < hi or hi == chunk.numel))]
            s0, s1 = members[0], members[-1] + 1
            assert members == list(range(s0, s1)), "a piece's parameters are consecutive"
            first = [max(lo - starts[s], 0) for s in range(s0, s1)]
            seg_starts = [max(starts[s], lo) - lo for s in range(s0, s1)] + [hi - lo]
            pieces.append(Chunk(
                params=chunk.params[s0:s1], positions=chunk.positions[s0:s1],
                seg_starts=torch.tensor(seg_starts, dtype=torch.int64, device=device),
                seg_canon=torch.tensor([canon[s] + f for s, f in zip(range(s0, s1), first)],
                                       dtype=torch.int64, device=device),
                numel=hi - lo, start=lo, parent_params=slice(s0, s1),
                param_ranges=tuple((base[s0 + k] + f, seg_starts[k + 1] - seg_starts[k]) for k, f in enumerate(first)),
            ))
        chunk.pieces[key] = tuple(pieces)
        return chunk.pieces[key]

    def views(self, param) -> dict:
        """``{"m", "b"}`` of ``param``: views of the flat state, shaped (and strided) like the parameter."""
        start, param = self.offset[param], local(param)  # a DTensor: its local shard's m, b
        n = param.numel()
        m, b = self.m[start : start + n], self.b[start : start + n]
        if param.is_contiguous() or memory_perm(param) is None:
            return {"m": m.view(param.shape), "b": b.view(param.shape)}
        # Chunk order is the parameter's memory order (channels_last: NHWC): give m, b its strides.
        return {"m": m.as_strided(param.shape, param.stride()), "b": b.as_strided(param.shape, param.stride())}

    # -- the exchange --------------------------------------------------------------------

    def compress(self, grad_D: torch.Tensor, chunk: Chunk, *, mask_T=None, used_P=None, flag=None) -> torch.Tensor:
        """Update m, b from this rank's gradient of ``chunk`` and draw its bits (uint8 [ceil(D/8)]).

        Non-finite gradient elements never enter m and b; ``flag[0]`` is set to 1 if any active one is seen.
        """
        return kernels.compress(
            grad_D, self.m, self.b, chunk.seg_starts, chunk.seg_canon,
            beta=self.beta, seed=self.step_seed(STAGE_COMPRESS), mask_T=mask_T, used_P=used_P,
            amsgrad=self.amsgrad, flag=flag, g_scale=self.g_scale, **self.rule_kwargs(),
        )

    def set_grad_norm(self, norm: float) -> None:
        """grad_clip: this step's gradient enters m and b scaled by min(1, clip / norm) (1 if norm is not finite)."""
        self.last_grad_norm = norm
        self.g_scale = self.clip / norm if self.clip is not None and math.isfinite(norm) and norm > self.clip else 1.0

    def rule_kwargs(self, step: int | None = None) -> dict:
        """The update rule's arguments of ``kernels.compress`` at ``step`` (default: this step).

        ``ratio_scale`` is the bias correction of m and b (both start at 0): it cancels when they share
        one EMA factor under the paper's rule (exactly 1.0, the paper's bits); otherwise, with ``t`` the
        number of updates so far including this one, r = m / (1 - beta^t) over b / (1 - beta2^t)
        (``abs``) or over sqrt(b / (1 - beta2^t)) (``rms``).
        """
        t = (self.step if step is None else step) + 1
        if self.normalizer == "abs" and self.beta2 == self.beta:
            scale = 1.0
        else:
            debias_b = 1.0 - self.beta2 ** t
            scale = (math.sqrt(debias_b) if self.normalizer == "rms" else debias_b) / (1.0 - self.beta ** t)
        return dict(beta2=self.beta2, rms=self.normalizer == "rms", ratio_scale=scale)

    def exchange(self, grad_D: torch.Tensor, chunk: Chunk, *, mask_T=None, used_P=None, flag=None,
                 extra_wire: WireBytes | None = None, count_exchange: bool = True) -> Packed:
        """Compress, then reduce 1 bit per element over the ranks: the packed sum, the same on every rank."""
        bits_B = self.compress(grad_D, chunk, mask_T=mask_T, used_P=used_P, flag=flag)
        return self.reduce(bits_B, chunk, extra_wire=extra_wire, count_exchange=count_exchange)

    def reduce(self, bits_B: torch.Tensor, chunk: Chunk, *, extra_wire: WireBytes | None = None,
               count_exchange: bool = True) -> Packed:
        """The second half of :meth:`exchange`: the 1-bit collective over ``chunk``'s compressed bits."""
        if self.collective is None:
            return Packed(bits_B.view(1, -1), planes=False, num_rows=1)
        # The collective's own draws are keyed by the step, not by this rank: which rank
        # owns an element's chunk depends on DDP's bucket layout, which a resume changes.
        packed = self.collective.reduce_packed(bits_B, chunk.numel, chunk.index_map,
                                               seed=mix_seed(self.seed, self.step))
        wire = self.collective.wire_bytes(chunk.numel)
        if extra_wire is not None:
            wire = wire + extra_wire
        self.stats.add(wire, exchanges=int(count_exchange))
        return packed

    # -- persistence -----------------------------------------------------------------------

    def load_flat(self, m: torch.Tensor, b: torch.Tensor) -> None:
        """Copy saved flat m, b (canonical order, T elements each) into the live state."""
        for name, saved, live in (("m", m, self.m), ("b", b, self.b)):
            if saved.numel() != live.numel():
                raise ValueError(f"Birder state {name} holds {saved.numel()} elements, this model {live.numel()}")
            live.copy_(saved.reshape(-1).to(device=live.device, dtype=torch.float32))
