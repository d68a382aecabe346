"""The model's parameters as fragments of one flat vector, each cut into one shard per local rank.

Legend: T elements of all parameters (``parameters()`` order, each flattened in memory order),
D elements of one fragment, L ranks per node, S elements of one rank's shard of a fragment.

A fragment is a list of segments ``(parameter index, first, count)``; its vector is their
elements in that order. ``fragments=F`` (an int) cuts the flat vector into F runs of near-equal
length (whole blocks of the quantizer where they fit; a parameter may straddle two fragments);
a list of modules or of parameter lists (torchft's ``model_fragments``) makes one fragment of
each, whole parameters. Where F (or L) whole blocks do not fit, the cuts fall at multiples of 8
elements instead (or of 1), so no part is left empty while there are elements for it. The ranks of a node hold the same replica (DDP), so each exchanges
only its own shard of a fragment: shard l = ``[l C, (l + 1) C)`` with C = D / L rounded up to
whole blocks (the last shards may be short or empty).
"""

import dataclasses

import torch

from dist_supernet.comm import chunk_elems
from dist_supernet.optim.compressor import flat_view, memory_perm


def flat_views(params) -> list:
    """Each parameter's 1-D view in memory order; ValueError for a layout with gaps (no flat view)."""
    views = []
    for i, p in enumerate(params):
        if not p.is_contiguous() and memory_perm(p) is None:
            raise ValueError(f"parameter {i} (shape {list(p.shape)}) is not dense in memory: DiLoCo needs a flat view")
        views.append(flat_view(p.data))
    return views


@dataclasses.dataclass
class Fragment:
    """One fragment: its segments, its length D, and this rank's shard [shard_lo, shard_hi) of it."""

    index: int
    segments: list  # [(param index, first element, count)]
    numel: int
    shard_numel: int  # C: the per-rank chunk (the last shards hold less, maybe nothing)
    shard_lo: int
    shard_hi: int

    @property
    def shard_len(self) -> int:
        return self.shard_hi - self.shard_lo


def _runs(sizes: list[int], lo: int, hi: int) -> list:
    """The segments of the flat range [lo, hi) over parameters of these sizes."""
    segments, start = [], 0
    for i, size in enumerate(sizes):
        a, b = max(lo, start), min(hi, start + size)
        if b > a:
            segments.append((i, a - start, b - a))
        start += size
    return segments


def _fitting(granule: int, numel: int, parts: int) -> int:
    """``granule`` where ``parts`` whole granules fit in ``numel``, else 8, else 1 (a small model: no empty parts)."""
    for size in (granule, 8):
        if numel >= parts * size:
            return size
    return 1


def split_fragments(params, fragments, *, local_rank: int, local_world_size: int, granule: int = 8) -> list:
    """The fragments of ``params`` (an int F, or a list of modules / parameter lists) with this rank's shards.

    Example::
        >>> ps = [torch.zeros(10), torch.zeros(6)]
        >>> [(f.segments, f.shard_lo, f.shard_hi) for f in split_fragments(ps, 2, local_rank=0, local_world_size=1)]
        [([(0, 0, 8)], 0, 8), ([(0, 8, 2), (1, 0, 6)], 0, 8)]
    """
    params = list(params)
    sizes = [p.numel() for p in params]
    if isinstance(fragments, int):
        total = sum(sizes)
        if fragments < 1:
            raise ValueError(f"fragments={fragments}: expected >= 1")
        step = chunk_elems(total, fragments, _fitting(granule, total, fragments)) if total else 0
        ranges = [(min(f * step, total), min((f + 1) * step, total)) for f in range(fragments)]
        groups = [_runs(sizes, lo, hi) for lo, hi in ranges]
    else:
        index = {id(p): i for i, p in enumerate(params)}
        groups, seen = [], set()
        for f, part in enumerate(fragments):
            members = list(part.parameters()) if isinstance(part, torch.nn.Module) else list(part)
            segs = []
            for p in members:
                if id(p) not in index:
                    raise ValueError(f"fragments[{f}] holds a parameter that is not one of the model's")
                if id(p) in seen:
                    raise ValueError(f"fragments[{f}] holds a parameter that an earlier fragment holds too")
                seen.add(id(p))
                segs.append((index[id(p)], 0, p.numel()))
            groups.append(segs)
    out = []
    for f, segs in enumerate(groups):
        numel = sum(n for _, _, n in segs)
        chunk = chunk_elems(numel, local_world_size, _fitting(granule, numel, local_world_size)) if numel else 0
        lo, hi = min(local_rank * chunk, numel), min((local_rank + 1) * chunk, numel)
        out.append(Fragment(f, segs, numel, chunk, lo, hi))
    return out


class FlatParams:
    """Read and update fragments of the parameters through flat views (no copy of the model is kept).

    Example::
        >>> ps = [torch.nn.Parameter(torch.arange(3.0)), torch.nn.Parameter(torch.ones(2))]
        >>> flat = FlatParams(ps)
        >>> frag = split_fragments(ps, 1, local_rank=0, local_world_size=1)[0]
        >>> flat.gather(frag, 1, 4).tolist()
        [1.0, 2.0, 1.0]
    """

    def __init__(self, params):
        self.params = list(params)
        self.views = flat_views(self.params)

    def _pieces(self, fragment: Fragment, lo: int, hi: int):
        """(flat view slice, start in [lo, hi), end) for each part of elements [lo, hi) of the fragment."""
        pos = 0
        for i, first, count in fragment.segments:
            a, b = max(lo, pos), min(hi, pos + count)
            if b > a:
                yield self.views[i][first + a - pos:first + b - pos], a - lo, b - lo
            pos += count

    @torch.no_grad()
    def gather(self, fragment: Fragment, lo: int | None = None, hi: int | None = None, *, device=None) -> torch.Tensor:
        """Elements [lo, hi) of the fragment's vector as a new float32 tensor (default: all of it)."""
        lo = 0 if lo is None else lo
        hi = fragment.numel if hi is None else hi
        device = device or (self.params[0].device if self.params else "cpu")
        out = torch.empty(hi - lo, dtype=torch.float32, device=device)
        for view, a, b in self._pieces(fragment, lo, hi):
            out[a:b].copy_(view)
        return out

    @torch.no_grad()
    def assign(self, fragment: Fragment, values: torch.Tensor) -> None:
        """The fragment's parameters = ``values`` (float32 [D])."""
        for view, a, b in self._pieces(fragment, 0, fragment.numel):
            view.copy_(values[a:b])

    @torch.no_grad()
    def mix(self, fragment: Fragment, values: torch.Tensor, alpha: float) -> None:
        """theta = alpha theta + (1 - alpha) values, i.e. lerp(theta, values, 1 - alpha), in float32."""
        for view, a, b in self._pieces(fragment, 0, fragment.numel):
            view.copy_(torch.lerp(view.to(torch.float32), values[a:b], 1.0 - alpha))

    @torch.no_grad()
    def subtract(self, fragment: Fragment, values: torch.Tensor) -> None:
        """theta = theta - values, in float32."""
        for view, a, b in self._pieces(fragment, 0, fragment.numel):
            view.copy_(view.to(torch.float32) - values[a:b])
