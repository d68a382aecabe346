"""Pure-torch reference of every Birder kernel: the contract, and the fallback path.

Every compiled backend of this package (numba on CPU, Triton on CUDA) must
produce the same bits, the same m and b and the same updated parameters as
the functions here, bit for bit. The rounding is therefore fixed: every
product and sum below is rounded to float32 on its own (no fused
multiply-add), and ``beta``, ``1 - beta``, ``lr`` and ``weight_decay`` enter
as float32 constants. See docs/kernels.md for the contract in prose.

Legend (shape suffixes used below)
    D  number of elements in a flat chunk (a DDP bucket, or all parameters)
    B  number of bytes holding D bits, ceil(D / 8)
    P  number of parameter segments in a chunk
    T  number of elements of the whole model (the canonical state m_T, b_T, mask_T)
    C  number of elements of a collective's chunk (requantize; C = 8 * Cb)
    N  number of packed rows (ranks, nodes) being reduced
    K  number of bit planes used to encode an exact count, ceil(log2(N + 1))
    R  number of chunk rows in a planes payload ([R, K, Cb])

Index map of a chunk (no per-element index tensor exists in memory)
    seg_starts int64 [P + 1]: chunk-local start of each segment, seg_starts[0] = 0, seg_starts[P] = D;
    seg_canon  int64 [P]: canonical index of each segment's first element;
    canon(j) = seg_canon[s] + (j - seg_starts[s]) for seg_starts[s] <= j < seg_starts[s + 1].
    Segments may be empty. Canonical indices are 64-bit.

Bit layout
    element i lives in byte i // 8, bit i % 8 (least significant bit first);
    bit 1 means +1 and bit 0 means -1. Padding bits past D are 0. Counts of N
    rows are stored as K bit planes: plane k is the packed bit array of bit k
    of every count.

Random draws
    A counter-based hash, not a stateful generator: the uniform for element j
    is a function of (seed, canon(j)) only, so the draw does not depend on
    how DDP groups parameters into buckets (DDP rebuilds its buckets after the
    first iteration, and again after every resume). The hash is two rounds of
    Chris Wellons' lowbias32 finaliser with the two 32-bit halves of the seed
    mixed in, plus a third round with the high 32 bits of the index when they
    are not 0 (so indices below 2**32 keep the bits they always had); the top
    24 bits make the uniform.
"""

import torch

MASK32 = 0xFFFFFFFF
HASH_MUL_1 = 0x7FEB352D
HASH_MUL_2 = 0x846CA68B
UNIFORM_BITS = 24  # float32 has a 24-bit significand: every value k / 2**24 is exact

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
_GATHER_BITS = 0x0102040810204080


def num_bytes(numel: int) -> int:
    """Bytes needed to hold ``numel`` bits."""
    return (numel + 7) // 8


def count_bits(num_rows: int) -> int:
    """Bit planes needed for an exact count in [0, num_rows]: ceil(log2(num_rows + 1))."""
    return max(1, int(num_rows).bit_length())


def as_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as a Python float): how every scalar enters a kernel."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def divide_rows(numerator: torch.Tensor, num_rows: int) -> torch.Tensor:
    """float32 ``numerator / num_rows``, one IEEE division on every device.

    The divisor is a tensor on the numerator's device, never a Python number: CUDA's
    ``tensor / number`` multiplies by the float32 reciprocal, which is 1 ulp off the quotient for
    some values at n in {6, 7, 10-15, 18, ...} (and the numba and Triton kernels divide).

    Example::
        >>> divide_rows(torch.tensor([3.0, -6.0]), 6).tolist()
        [0.5, -1.0]
    """
    return numerator / torch.full((), float(num_rows), dtype=torch.float32, device=numerator.device)


def _to_int32(value: int) -> int:
    """A uint32 value as the int32 with the same bits."""
    value &= MASK32
    return value - (1 << 32) if value >= (1 << 31) else value


_MUL_1_I32 = _to_int32(HASH_MUL_1)
_MUL_2_I32 = _to_int32(HASH_MUL_2)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    # lowbias32 on int32 lanes holding uint32 bits, in place: products wrap
    # modulo 2**32 as uint32 would, and the right shifts are masked so they act
    # as logical shifts. In-place int32 is 6x faster on CPU than int64 lanes.
    x ^= (x >> 16) & 0xFFFF
    x *= _MUL_1_I32
    x ^= (x >> 15) & 0x1FFFF
    x *= _MUL_2_I32
    x ^= (x >> 16) & 0xFFFF
    return x


def uniform(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform float32 in [0, 1) for each canonical index, keyed by a 64-bit seed.

    In uint32 arithmetic, with i the index and lo32 / hi32 its two halves:
    x = lowbias32(lowbias32(lo32(i) ^ seed_lo) ^ seed_hi), then, only where
    hi32(i) != 0, x = lowbias32(x ^ hi32(i)); u = (x >> 8) / 2**24.
    int64 indices are 64-bit two's complement; int32 (or narrower) indices
    are read as their uint32 bits (hi32 = 0), as they always were.

    Example::
        >>> u = uniform(torch.arange(4), seed=7)
        >>> bool(((u >= 0) & (u < 1)).all())
        True
        >>> bool(uniform(torch.tensor([2**32 + 3]), 7) != uniform(torch.tensor([3]), 7))
        True
    """
    x = index.to(torch.int32, copy=True)  # int64 -> int32 keeps the low 32 bits
    x ^= _to_int32(seed)
    _mix32_(x)
    x ^= _to_int32(seed >> 32)
    _mix32_(x)
    if index.dtype == torch.int64 and index.numel():
        high = (index >> 32).to(torch.int32)
        # On CPU skip the third round when no index needs it (a host read is free there);
        # on CUDA always compute it rather than sync the host.
        if index.is_cuda or bool((high != 0).any()):
            extra = _mix32_(x ^ high)
            x = torch.where(high != 0, extra, x)
    x >>= 32 - UNIFORM_BITS
    x &= (1 << UNIFORM_BITS) - 1
    return x.to(torch.float32).mul_(1.0 / (1 << UNIFORM_BITS))


def pack_bits(bits_D: torch.Tensor) -> torch.Tensor:
    """Pack a bool (or 0/1) vector into uint8, LSB first; padding bits are 0.

    Example::
        >>> pack_bits(torch.tensor([True, False, True])).tolist()
        [5]
    """
    numel = bits_D.numel()
    padded = torch.zeros(num_bytes(numel) * 8, dtype=torch.uint8, device=bits_D.device)
    padded[:numel] = bits_D.reshape(-1)
    # Eight 0/1 bytes form one little-endian int64 word; the multiply gathers byte j
    # into bit j of the top byte without carries (each partial product lands on its
    # own bit). 5x faster on CPU than shifting and summing 8 columns. The product
    # wraps past 2**63; only the top byte is kept.
    if padded.numel() and torch.tensor([1], dtype=torch.int16).view(torch.uint8)[0] == 1:
        words = padded.view(torch.int64)
        return ((words * _GATHER_BITS) >> 56).to(torch.uint8)
    shifts = _BIT_SHIFTS.to(bits_D.device)
    return (padded.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed_NB: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for one or more rows: uint8 [..., B] -> uint8 0/1 [..., numel].

    Example::
        >>> unpack_bits(torch.tensor([5], dtype=torch.uint8), 3).tolist()
        [1, 0, 1]
    """
    shifts = _BIT_SHIFTS.to(packed_NB.device)
    bits = (packed_NB.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :numel]


def check_index_map(seg_starts: torch.Tensor, seg_canon: torch.Tensor) -> int:
    """Validate the dtypes and shapes of a chunk's index map (no host sync); returns P."""
    if seg_starts.dtype != torch.int64 or seg_canon.dtype != torch.int64:
        raise ValueError(f"seg_starts dtype={seg_starts.dtype}, seg_canon dtype={seg_canon.dtype}: expected torch.int64")
    if seg_starts.dim() != 1 or seg_canon.dim() != 1 or seg_starts.numel() != seg_canon.numel() + 1:
        raise ValueError(
            f"seg_starts shape={list(seg_starts.shape)}, seg_canon shape={list(seg_canon.shape)}: expected [P + 1] and [P]"
        )
    return seg_canon.numel()


def index_map(numels, canon_starts=None, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (seg_starts, seg_canon) of a chunk made of segments with these numels.

    canon_starts: canonical index of each segment's first element; default:
    the segments are consecutive in canonical order from 0.

    Example::
        >>> starts, canon = index_map([3, 0, 2], [10, 13, 2**32])
        >>> starts.tolist(), canon.tolist()
        ([0, 3, 3, 5], [10, 13, 4294967296])
    """
    numels = [int(n) for n in numels]
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + n)
    if canon_starts is None:
        canon_starts = starts[:-1]
    if len(canon_starts) != len(numels):
        raise ValueError(f"canon_starts has {len(canon_starts)} entries, expected one per segment ({len(numels)})")
    return (
        torch.tensor(starts, dtype=torch.int64, device=device),
        torch.tensor([int(c) for c in canon_starts], dtype=torch.int64, device=device),
    )


def segment_runs(seg_starts: torch.Tensor, seg_canon: torch.Tensor, first: int, count: int) -> list:
    """The chunk positions [first, first + count) as runs (lo, hi, canon(lo), s) of one segment each, in order.

    Positions at or past D (padding) continue the last segment; with P = 0 the index of a
    position is the position itself (s = 0). Host lists: the reference loops over segments.
    """
    num_segments = check_index_map(seg_starts, seg_canon)
    end = int(first) + int(count)
    if count <= 0:
        return []
    if num_segments == 0:
        return [(int(first), end, int(first), 0)]
    starts, canon = seg_starts.tolist(), seg_canon.tolist()
    runs = []
    for s in range(num_segments):
        lo = max(starts[s], int(first))
        hi = end if s == num_segments - 1 else min(starts[s + 1], end)
        if hi > lo:
            runs.append((lo, hi, canon[s] + lo - starts[s], s))
    return runs


def canonical_index(
    seg_starts: torch.Tensor, seg_canon: torch.Tensor, first: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """canon(j) and the segment s of j for the chunk positions j in [first, first + count).

    Returns (int64 [count], int64 [count]). Positions at or past D (padding) fall in
    the last segment, so their index is some int64 (the callers' bits are 0 there).
    The only per-element index tensors of the package: the reference materialises them,
    the compiled backends do not.
    """
    device = seg_starts.device
    runs = segment_runs(seg_starts, seg_canon, first, count)
    if not runs:
        return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    index = torch.cat([torch.arange(c, c + hi - lo, dtype=torch.int64, device=device) for lo, hi, c, _ in runs])
    seg = torch.cat([torch.full((hi - lo,), s, dtype=torch.int64, device=device) for lo, hi, _, s in runs])
    return index, seg


def _gather_runs(state: torch.Tensor, runs, offset: int) -> torch.Tensor:
    """state[canon(j) - offset] for every run, concatenated: slices, not a per-element gather."""
    pieces = [state[c - offset : c - offset + hi - lo] for lo, hi, c, _ in runs]
    return pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces)


def rule_constants(beta: float, beta2: float, rms: bool, g_scale: float) -> tuple[float, float, float, float]:
    """(beta, (1 - beta) g_scale, beta2, (1 - beta2) g_scale^(2 if rms else 1)), each rounded to float32 once."""
    g_scale = float(g_scale)
    return (as_float32(beta), as_float32((1.0 - float(beta)) * g_scale), as_float32(beta2),
            as_float32((1.0 - float(beta2)) * (g_scale * g_scale if rms else g_scale)))


def compress(
    g_D: torch.Tensor,
    m_T: torch.Tensor,
    b_T: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_canon: torch.Tensor,
    *,
    beta: float,
    seed: int,
    mask_T: torch.Tensor | None = None,
    used_P: torch.Tensor | None = None,
    amsgrad: bool = False,
    flag: torch.Tensor | None = None,
    state_offset: int = 0,
    beta2: float | None = None,
    rms: bool = False,
    ratio_scale: float = 1.0,
    g_scale: float = 1.0,
) -> torch.Tensor:
    """Birder's per-worker step on one chunk: update m and b in place, binary-randomise m / b, pack.

    g_D: gradient [D] (fp32, bf16 or fp16); m_T, b_T: fp32 canonical state,
    read and written at canon(j) - state_offset (state_offset is 0 when m_T
    holds the whole model; tests use it to reach canonical indices past 2**32
    without allocating them); mask_T: bool [T] (True = received a gradient) or
    None; used_P: uint8/bool [P] or None; flag: uint8 [1] or None.

    For active and finite elements: m = fl(fl(beta m) + fl((1 - beta) g)),
    b = fl(fl(beta2 b) + fl((1 - beta2) |g|)) (max with the old b if amsgrad);
    all other elements keep m and b. r = fl(m ratio_scale) / b (0 where b <= 0);
    bit j is 1 iff j is active, g[j] is finite and uniform(canon(j), seed) < (1 + r) / 2
    (so |r| > 1 acts as +-1). beta2 = None means beta2 = beta (the paper's rule; then
    |m| <= b and r is in [-1, 1]). rms: b is the EMA of fl(g g) and the denominator
    is sqrt(b) (correctly rounded): Adam's second moment in place of the EMA of |g|.
    g_scale: g enters m and b as g_scale g, folded into the constants: (1 - beta) and
    (1 - beta2) are multiplied by g_scale (by g_scale^2 under rms) before their one
    rounding to float32 (1.0: the constants as above; gradient clipping passes < 1).
    flag[0] is set to 1 (never cleared) when an active g is not finite.
    Returns uint8 [B], padding bits 0.

    Example::
        >>> g = torch.tensor([1.0, -2.0, 0.0]); m = torch.zeros(3); b = torch.zeros(3)
        >>> starts, canon = index_map([3])
        >>> bits = compress(g, m, b, starts, canon, beta=0.9, seed=0)
        >>> unpack_bits(bits, 3).tolist()[:2]   # |r| = 1: deterministic
        [1, 0]
    """
    numel = g_D.numel()
    runs = segment_runs(seg_starts, seg_canon, 0, numel)
    if not runs:
        return torch.zeros(0, dtype=torch.uint8, device=g_D.device)
    offset = int(state_offset)
    canon, seg = canonical_index(seg_starts, seg_canon, 0, numel)
    g = g_D.reshape(-1).to(torch.float32)
    beta2 = beta if beta2 is None else beta2
    beta_f, one_minus_beta_f, beta2_f, one_minus_beta2_f = rule_constants(beta, beta2, rms, g_scale)
    # m, b (and the mask) of a segment are contiguous at canonical offsets: slices, not gathers
    m, b = _gather_runs(m_T, runs, offset), _gather_runs(b_T, runs, offset)
    active = None
    if mask_T is not None:
        active = _gather_runs(mask_T, runs, offset) != 0
    if used_P is not None:
        used = used_P[seg] != 0
        active = used if active is None else active & used
    finite = torch.isfinite(g)
    update = finite if active is None else finite & active
    # Each product rounded on its own, then the sum: the contract's two-rounding form.
    m_new = m * beta_f + g * one_minus_beta_f
    b_new = b * beta2_f + (g * g if rms else g.abs()) * one_minus_beta2_f
    if amsgrad:
        b_new = torch.maximum(b, b_new)
    m = torch.where(update, m_new, m)
    b = torch.where(update, b_new, b)
    for lo, hi, c, _ in runs:
        m_T[c - offset : c - offset + hi - lo].copy_(m[lo:hi])
        b_T[c - offset : c - offset + hi - lo].copy_(b[lo:hi])
    if flag is not None:
        bad = ~finite if active is None else active & ~finite
        flag.bitwise_or_(bad.any().to(torch.uint8))
    # r = 0 where b <= 0; a NaN b (corrupt state) gives a NaN probability, so bit 0.
    denominator = b.sqrt() if rms else b
    ratio = torch.where(b <= 0, torch.zeros_like(m), (m * as_float32(ratio_scale)) / denominator)
    probability = (ratio + 1.0) * 0.5
    bits = update & (uniform(canon, seed) < probability)
    return pack_bits(bits)


def requantize(
    counts_C: torch.Tensor,
    num_rows: int,
    seg_starts: torch.Tensor,
    seg_canon: torch.Tensor,
    first: int,
    *,
    seed: int,
) -> torch.Tensor:
    """Exact counts in [0, N] -> 1 bit each: bit i is 1 iff uniform(canon(first + i), seed) < count / N.

    counts_C: integer [C], the counts of chunk positions first .. first + C - 1
    (positions at or past D are padding with count 0, so bit 0). Unbiased for
    the mean. Returns uint8 [ceil(C / 8)].

    Example::
        >>> starts, canon = index_map([3])
        >>> bits = requantize(torch.tensor([4, 0, 2]), 4, starts, canon, 0, seed=3)
        >>> unpack_bits(bits, 3).tolist()[:2]   # count 0 or N: deterministic
        [1, 0]
    """
    if num_rows <= 0:
        raise ValueError(f"num_rows={num_rows}: expected at least one counted row")
    canon, _ = canonical_index(seg_starts, seg_canon, first, counts_C.numel())
    probability = divide_rows(counts_C.reshape(-1).to(torch.float32), num_rows)
    return pack_bits(uniform(canon, seed) < probability)


def check_out(out: torch.Tensor | None, shape, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Validate an ``out=`` buffer: contiguous, of exactly this shape and dtype, on this device."""
    if out is None:
        return None
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device) \
            or not out.is_contiguous():
        raise ValueError(f"out shape={list(out.shape)} dtype={out.dtype} device={out.device} "
                         f"contiguous={out.is_contiguous()}: expected a contiguous {dtype} {list(shape)} on {device}")
    return out


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    if check_out(out, result.shape, result.dtype, result.device) is None:
        return result
    return out.copy_(result)


def unpack_counts(packed_NB: torch.Tensor, numel: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact count of +1 bits per element over N packed rows: uint8 [N, B] -> int32 [numel].

    out: an optional preallocated int32 [numel] result (the decoders' outputs are 4 bytes per
    element: a fresh one per call pays the first-touch page faults, see docs/kernels.md).

    Example::
        >>> unpack_counts(torch.tensor([[5], [1]], dtype=torch.uint8), 3).tolist()
        [2, 0, 1]
    """
    return _into(out, unpack_bits(packed_NB, numel).sum(dim=0, dtype=torch.int32))


def unpack_mean(
    packed_NB: torch.Tensor,
    numel: int,
    *,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Average of N rows of ±1: (2 * count - N) / N as float32 [numel]; 0 where mask is False.

    out: an optional preallocated float32 [numel] result.

    Example::
        >>> unpack_mean(torch.tensor([[5], [1]], dtype=torch.uint8), 3).tolist()
        [1.0, -1.0, 0.0]
    """
    num_rows = packed_NB.shape[0]
    counts = unpack_counts(packed_NB, numel)
    return counts_to_mean(counts, num_rows, mask=mask, out=out)


def counts_to_mean(
    counts: torch.Tensor,
    num_rows: int,
    *,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(2 * count - N) / N as float32 (one rounding: 2 * count - N is exact); 0 where mask is False.

    out: an optional preallocated float32 result shaped like counts.

    Example::
        >>> counts_to_mean(torch.tensor([0, 1, 2]), 2).tolist()
        [-1.0, 0.0, 1.0]
    """
    mean = divide_rows((counts * 2 - num_rows).to(torch.float32), num_rows)
    if mask is not None:
        mean = torch.where(mask, mean, torch.zeros_like(mean))
    return _into(out, mean)


def pack_counts(counts_D: torch.Tensor, num_planes: int) -> torch.Tensor:
    """Counts in [0, 2**K) -> K bit planes: int [D] -> uint8 [K, B].

    Example::
        >>> pack_counts(torch.tensor([3, 0, 2]), 2).tolist()
        [[1], [5]]
    """
    planes = [pack_bits((counts_D >> plane) & 1) for plane in range(num_planes)]
    return torch.stack(planes) if planes else counts_D.new_zeros((0, num_bytes(counts_D.numel())), dtype=torch.uint8)


def unpack_planes(planes_KB: torch.Tensor, numel: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_counts` for [..., K, B] -> int32 [..., numel]; out: optional preallocated result.

    Example::
        >>> unpack_planes(torch.tensor([[1], [5]], dtype=torch.uint8), 3).tolist()
        [3, 0, 2]
    """
    num_planes = planes_KB.shape[-2]
    bits = unpack_bits(planes_KB, numel)  # uint8 [..., K, numel]
    counts = bits.select(-2, 0).to(torch.int32)
    for plane in range(1, num_planes):
        counts += bits.select(-2, plane).to(torch.int32) << plane
    return _into(out, counts)


def apply_update_(
    x: torch.Tensor,
    update: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """x -= lr * (update + weight_decay * x) in place; elements where mask is False do not move.

    In float32 whatever x's dtype, each product rounded on its own (no fma):
    s = update + fl(wd x) (the product is skipped when weight_decay == 0),
    x = fl(x - fl(lr s)), rounded once to x's dtype at the store. update and
    mask have x's number of elements, in x's logical order.

    Example::
        >>> apply_update_(torch.ones(3), torch.tensor([1.0, -1.0, 0.0]), lr=0.5, weight_decay=0.0).tolist()
        [0.5, 1.5, 1.0]
    """
    x32 = x.to(torch.float32)
    step = update.reshape(x.shape).to(torch.float32)
    if weight_decay != 0.0:
        step = step + x32 * as_float32(weight_decay)
    new = x32 - step * as_float32(lr)
    if mask is not None:
        new = torch.where(mask.reshape(x.shape), new, x32)
    return x.copy_(new)


def check_payload(payload: torch.Tensor, *, planes: bool, numel: int) -> None:
    """Validate a chunk's packed result: uint8 [N, B'] rows (planes=False) or [R, K, Cb] planes holding numel."""
    if planes:
        if payload.dim() != 3 or payload.dtype != torch.uint8:
            raise ValueError(f"payload: expected uint8 [R, K, Cb] with planes=True, got {payload.dtype} {list(payload.shape)}")
        capacity = payload.shape[0] * payload.shape[2] * 8
        if capacity < numel:
            raise ValueError(f"payload holds {capacity} elements, too few for numel={numel}")
        return
    if payload.dim() != 2 or payload.dtype != torch.uint8:
        raise ValueError(f"payload: expected uint8 [N, B] with planes=False, got {payload.dtype} {list(payload.shape)}")
    if payload.shape[1] * 8 < numel:
        raise ValueError(f"payload has {payload.shape[1]} bytes per row, too few for numel={numel}")


def payload_counts(payload: torch.Tensor, *, planes: bool, numel: int) -> torch.Tensor:
    """int32 [numel] exact counts of a chunk's packed result (see :func:`check_payload`)."""
    check_payload(payload, planes=planes, numel=numel)
    if planes:
        return unpack_planes(payload, payload.shape[2] * 8).reshape(-1)[:numel]
    return unpack_counts(payload, numel)


def check_segment_params(xs, seg_starts: torch.Tensor) -> list[int]:
    """The host copy of seg_starts, after checking that xs[s] has seg_starts[s + 1] - seg_starts[s] elements."""
    starts = seg_starts.tolist()
    if starts[0] != 0:
        raise ValueError(f"seg_starts[0]={starts[0]}: a chunk starts at 0")
    if len(xs) != len(starts) - 1:
        raise ValueError(f"xs has {len(xs)} tensors, expected one per segment ({len(starts) - 1})")
    for s, x in enumerate(xs):
        if x.numel() != starts[s + 1] - starts[s]:
            raise ValueError(f"xs[{s}] has {x.numel()} elements, its segment {starts[s + 1] - starts[s]}")
    return starts


def apply_packed_(
    xs,
    seg_starts: torch.Tensor,
    seg_canon: torch.Tensor,
    payload: torch.Tensor,
    *,
    planes: bool,
    num_rows: int,
    lr_P: torch.Tensor,
    wd_P: torch.Tensor,
    mask_T: torch.Tensor | None = None,
    used_P: torch.Tensor | None = None,
    state_offset: int = 0,
) -> None:
    """Fused decode-and-apply of one chunk: x -= lr * (mean + wd * x) for every active element.

    xs: the P parameter tensors of the chunk (any shape, dtype and memory
    format; element j is xs[s].reshape(-1)[j - seg_starts[s]]), updated in
    place. payload: uint8 [N, B'] rows of bits (planes=False; count(j) = set
    bits j over the rows) or uint8 [R, K, Cb] exact-count planes (planes=True;
    C = 8 Cb elements per row, count(j) = sum_k bit(payload[j // C, k], j % C) << k).
    mean(j) = float32(2 count(j) - num_rows) / num_rows; lr_P, wd_P: float32 [P].
    For active elements (mask_T[canon(j) - state_offset] and used_P[s], as in
    :func:`compress`): t = fl(wd x); s = fl(mean + t); x = fl(x - fl(lr s)) in
    float32, stored in x's dtype. Inactive elements do not move.

    Example::
        >>> xs = [torch.ones(2), torch.ones(1)]; starts, canon = index_map([2, 1])
        >>> rows = torch.stack([pack_bits(torch.tensor([1, 0, 1]))] * 2)
        >>> lr, wd = torch.tensor([0.5, 0.25]), torch.zeros(2)
        >>> apply_packed_(xs, starts, canon, rows, planes=False, num_rows=2, lr_P=lr, wd_P=wd)
        >>> xs[0].tolist(), xs[1].tolist()
        ([0.5, 1.5], [0.75])
    """
    check_index_map(seg_starts, seg_canon)
    starts = check_segment_params(xs, seg_starts)
    counts = payload_counts(payload, planes=planes, numel=starts[-1])
    mean = divide_rows((counts * 2 - num_rows).to(torch.float32), num_rows)
    canon = seg_canon.tolist()
    for s, x in enumerate(xs):
        lo, hi = starts[s], starts[s + 1]
        if hi == lo:
            continue
        x32 = x.reshape(-1).to(torch.float32)
        new = x32 - (mean[lo:hi] + x32 * wd_P[s]) * lr_P[s]
        active = None
        if mask_T is not None:
            first = canon[s] - int(state_offset)
            active = mask_T[first : first + hi - lo] != 0
        if used_P is not None:
            used = used_P[s] != 0
            active = used if active is None else active & used
        if active is not None:
            new = torch.where(active, new, x32)
        x.copy_(new.view(x.shape))


# -- randomized Hadamard rotation and the one-bit mean estimator (low-frequency synchronisation) --------
#
# Legend: D elements of the vector, Bk the block (a power of two), NB = ceil(D / Bk) blocks,
# Dp = NB * Bk the zero-padded length, N rows (workers) being averaged.
#
# The rotation of one block is R = H D1 H D0 / Bk: two rounds of a random sign flip (D0, D1) and the
# unnormalised Walsh-Hadamard transform H (Sylvester order), so R is orthogonal. The sign of position
# j (0 <= j < Dp) in round r is +1 where uniform(2 j + r, seed) >= 1/2. H is computed by butterflies,
# stage h = 1, 2, 4, ..., Bk / 2: (v[i], v[i + h]) -> (v[i] + v[i + h], v[i] - v[i + h]) for every i
# with i & h == 0. Every backend does exactly these float32 additions in this order, and the sign
# flips and the scaling below are exact, so the rotated values, the bits and the decoded means are the
# same bit for bit on every backend (only the two per-block sums of onebit_encode's scale round
# differently: they are reductions, compared with a tolerance).

RHT_MIN_BLOCK = 8  # a block's bits fill whole bytes
RHT_MAX_BLOCK = 8192  # one Triton program holds a block in registers


def check_block(block: int) -> int:
    """``block`` as log2(block); ValueError unless it is a power of two in [8, 8192]."""
    block = int(block)
    if block < RHT_MIN_BLOCK or block > RHT_MAX_BLOCK or block & (block - 1):
        raise ValueError(f"block={block}: expected a power of two in [{RHT_MIN_BLOCK}, {RHT_MAX_BLOCK}]")
    return block.bit_length() - 1


def num_blocks(numel: int, block: int) -> int:
    """Blocks of ``block`` elements that hold ``numel`` (the last one zero-padded)."""
    return -(-int(numel) // int(block))


def check_onebit_rows(bits_NB: torch.Tensor, scales_NS: torch.Tensor, numel: int, block: int) -> tuple[int, int]:
    """(rows N, blocks) of an onebit_decode input; ValueError naming the shapes unless they fit ``numel``, ``block``."""
    check_block(block)
    rows = bits_NB.shape[0]
    nblocks = num_blocks(numel, block)
    if bits_NB.dim() != 2 or bits_NB.shape[1] != nblocks * block // 8 or tuple(scales_NS.shape) != (rows, nblocks):
        raise ValueError(f"bits shape={list(bits_NB.shape)}, scales shape={list(scales_NS.shape)}: expected "
                         f"[N, {nblocks * block // 8}] and [N, {nblocks}] for numel={numel}, block={block}")
    if rows == 0:
        raise ValueError("onebit_decode needs at least one row")
    return rows, nblocks


def rht_signs(count: int, seed: int, rounds=(0, 1), *, device=None) -> torch.Tensor:
    """bool [len(rounds), count]: True where round r flips position j's sign (uniform(2 j + r, seed) < 1/2)."""
    index = torch.arange(count, dtype=torch.int64, device=device) * 2
    return torch.stack([uniform(index + r, seed) < 0.5 for r in rounds])


def _fwht(v_NK: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of each row of v (butterflies, stage h = 1, 2, 4, ...)."""
    rows, size = v_NK.shape
    h = 1
    while h < size:
        pairs = v_NK.view(rows, size // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        v_NK = torch.stack((a + b, a - b), dim=2).view(rows, size)
        h *= 2
    return v_NK


def _padded_blocks(x_D: torch.Tensor, block: int) -> torch.Tensor:
    numel = x_D.numel()
    padded = torch.zeros(num_blocks(numel, block) * block, dtype=torch.float32, device=x_D.device)
    padded[:numel] = x_D.reshape(-1)
    return padded.view(-1, block)


def _rotate(v: torch.Tensor, flips: torch.Tensor, transpose: bool) -> torch.Tensor:
    """H D1 H D0 v (forward) or D0 H D1 H v (transpose) on [NB, Bk] blocks; flips: bool [2, Dp]."""
    flip0, flip1 = (f.view(v.shape) for f in flips)
    if not transpose:
        v = torch.where(flip0, -v, v)
    v = _fwht(v)
    v = torch.where(flip1, -v, v)
    v = _fwht(v)
    if transpose:
        v = torch.where(flip0, -v, v)
    return v


def rht(x_D: torch.Tensor, seed: int, block: int, *, transpose: bool = False) -> torch.Tensor:
    """The two-round randomized Hadamard transform of each block, unnormalised: float32 [Dp].

    Forward: u = H D1 H D0 x per block (x zero-padded to Dp); ``transpose``: D0 H D1 H u. Each
    multiplies norms by ``block``, so ``rht(rht(x), transpose=True) = block**2 * x`` up to rounding.

    Example::
        >>> u = rht(torch.tensor([1.0, 2.0, 3.0]), seed=5, block=8)
        >>> u.shape, round(float(u.norm() / 8 / torch.tensor([1.0, 2.0, 3.0]).norm()), 4)
        (torch.Size([8]), 1.0)
    """
    check_block(block)
    v = _padded_blocks(x_D, block)
    return _rotate(v, rht_signs(v.numel(), seed, device=x_D.device), transpose).reshape(-1)


def onebit_encode(x_D: torch.Tensor, seed: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One bit per rotated coordinate and one float32 scale per block: (uint8 [Dp / 8], float32 [NB]).

    u = rht(x) per block; bit j = (u_j >= 0) (packed as :func:`pack_bits`); the scale of block b is
    c_b = sum(x_b**2) / sum(|u_b|) (0 where the block is zero). The decoder's estimate of the block is
    c_b D0 H D1 H sign(u_b): with the orthogonal R = rht / block this is S R^T sign(R x) with
    S = ||x||^2 / ||R x||_1, DRIVE's unbiased scale (docs/diloco.md derives it).

    Example::
        >>> bits, scales = onebit_encode(torch.tensor([1.0, -2.0, 0.5]), seed=3, block=8)
        >>> bits.shape, scales.shape
        (torch.Size([1]), torch.Size([1]))
    """
    check_block(block)
    x = _padded_blocks(x_D, block)
    u = _rotate(x, rht_signs(x.numel(), seed, device=x_D.device), transpose=False)
    sum_sq = (x * x).sum(dim=1)
    sum_abs = u.abs().sum(dim=1)
    scales = torch.where(sum_abs > 0, sum_sq / torch.where(sum_abs > 0, sum_abs, 1.0), 0.0)
    return pack_bits((u >= 0).reshape(-1)), scales


def onebit_decode(bits_NB: torch.Tensor, scales_NS: torch.Tensor, numel: int, seed: int, block: int) -> torch.Tensor:
    """The mean of N one-bit estimates that share one rotation (``seed``): float32 [numel].

    bits_NB: uint8 [N, Dp / 8]; scales_NS: float32 [N, NB] (rows of :func:`onebit_encode`, each
    from its own vector, all with this seed and block). z_j = (sum over rows i, in order, of
    +-c_i,b(j)) * fl(1 / N) in float32, then D0 H D1 H z per block, the first ``numel`` kept.

    Example::
        >>> x = torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
        >>> bits, scales = onebit_encode(x, seed=1, block=8)
        >>> onebit_decode(bits.view(1, -1), scales.view(1, -1), 8, seed=1, block=8).tolist()[0]
        4.0
    """
    rows, nblocks = check_onebit_rows(bits_NB, scales_NS, numel, block)
    padded = nblocks * block
    signs = unpack_bits(bits_NB, padded).view(rows, nblocks, block) != 0
    z = torch.zeros(nblocks, block, dtype=torch.float32, device=bits_NB.device)
    for i in range(rows):
        c = scales_NS[i].to(torch.float32).view(nblocks, 1)
        z = z + torch.where(signs[i], c, -c)
    z = z * as_float32(1.0 / rows)
    flips = rht_signs(padded, seed, device=bits_NB.device)
    return _rotate(z, flips, transpose=True).reshape(-1)[:numel]
