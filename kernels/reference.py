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
    A counter-based hash, not a stateful generator: the draw for element j is
    a function of (seed, canon(j)) only, so it does not depend on how DDP
    groups parameters into buckets (DDP rebuilds its buckets after the first
    iteration, and again after every resume). Two 32-bit round keys come from
    the 64-bit seed and the index's high 32 bits through splitmix64 (host work
    once per call, or once per run of 2**32 indices); each element then costs
    a keyed triple32 (three 32-bit multiplies) of its low 32 bits, and the top
    25 bits are the draw. Bits compare the draw with an exact integer
    threshold: P(bit) = threshold / 2**25, with no rounding in the comparison.
"""

import torch

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
HASH_MUL_1 = 0xED5AD4BB  # triple32's multipliers (Chris Wellons' hash prospector)
HASH_MUL_2 = 0xAC4C1B51
HASH_MUL_3 = 0x31848BAB
GOLDEN_64 = 0x9E3779B97F4A7C15  # splitmix64's increment and finaliser constants
SPLITMIX_MUL_1 = 0xBF58476D1CE4E5B9
SPLITMIX_MUL_2 = 0x94D049BB133111EB
# The draw is a 25-bit integer: fl(1 + r) is always a multiple of 2**-24 (see ratio_threshold), so
# (1 + r) / 2 is one of 2**-25 and the comparison of a 25-bit draw with it is exact.
DRAW_BITS = 25
DRAW_SHIFT = 32 - DRAW_BITS

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


def _to_int64(value: int) -> int:
    """A uint64 value as the int64 with the same bits."""
    value &= MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


_MUL_1_I32 = _to_int32(HASH_MUL_1)
_MUL_2_I32 = _to_int32(HASH_MUL_2)
_MUL_3_I32 = _to_int32(HASH_MUL_3)


def hash_keys(seed: int, high: int = 0) -> tuple[int, int]:
    """The two 32-bit round keys (k0, k1) of the draws of indices whose high 32 bits are ``high``.

    z = splitmix64(seed + high * 0x9E3779B97F4A7C15) in uint64 arithmetic (splitmix64 adds the
    constant once more, then finalises); k0 = lo32(z), k1 = hi32(z). For one high half the map
    seed -> (k0, k1) is a bijection, so two different seeds never share both keys.

    Example::
        >>> hash_keys(0) == hash_keys(0, 0) != hash_keys(0, 1)
        True
    """
    z = (int(seed) + int(high) * GOLDEN_64 + GOLDEN_64) & MASK64
    z = ((z ^ (z >> 30)) * SPLITMIX_MUL_1) & MASK64
    z = ((z ^ (z >> 27)) * SPLITMIX_MUL_2) & MASK64
    z ^= z >> 31
    return z & MASK32, z >> 32


def _keys_of_high(seed: int, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hash_keys per element of an int64 tensor of high halves, as int32 tensors (int64 lanes wrap as uint64 would)."""
    z = high * _to_int64(GOLDEN_64) + _to_int64(int(seed) + GOLDEN_64)
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _to_int64(SPLITMIX_MUL_1)  # masked: logical shifts
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _to_int64(SPLITMIX_MUL_2)
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    return z.to(torch.int32), (z >> 32).to(torch.int32)


def _keyed_triple32_(x: torch.Tensor, k0, k1) -> torch.Tensor:
    # triple32 with k0 xored into the input and k1 after the first multiply, in place on int32
    # lanes holding uint32 bits: products wrap modulo 2**32 as uint32 would, and the right shifts
    # are masked so they act as logical shifts (in-place int32 is 6x faster on CPU than int64
    # lanes). k0, k1: int32 scalars or tensors.
    x ^= k0
    x ^= (x >> 17) & 0x7FFF
    x *= _MUL_1_I32
    x ^= (x >> 11) & 0x1FFFFF
    x ^= k1
    x *= _MUL_2_I32
    x ^= (x >> 15) & 0x1FFFF
    x *= _MUL_3_I32
    x ^= (x >> 14) & 0x3FFFF
    return x


def draw(index: torch.Tensor, seed: int) -> torch.Tensor:
    """The 25-bit draw of each canonical index under a 64-bit seed: int32 in [0, 2**25).

    In uint32 arithmetic, with lo32 / hi32 the halves of the index and (k0, k1) =
    :func:`hash_keys` (seed, hi32): x = lo32 ^ k0; x ^= x >> 17; x *= 0xED5AD4BB;
    x ^= x >> 11; x ^= k1; x *= 0xAC4C1B51; x ^= x >> 15; x *= 0x31848BAB; x ^= x >> 14;
    draw = x >> 7 (Chris Wellons' triple32, keyed). int64 indices are
    64-bit two's complement; int32 (or narrower) indices are read as their uint32 bits (hi32 = 0).
    For one key pair the map lo32 -> x is a bijection, so over the 2**32 indices sharing a high
    half every draw value occurs exactly 2**7 times: u = draw / 2**25 is exactly uniform on its grid.

    Example::
        >>> d = draw(torch.arange(4), seed=7)
        >>> bool(((d >= 0) & (d < 2**25)).all())
        True
        >>> bool(draw(torch.tensor([2**32 + 3]), 7) != draw(torch.tensor([3]), 7))
        True
    """
    x = index.to(torch.int32, copy=True)  # int64 -> int32 keeps the low 32 bits
    k0, k1 = (_to_int32(k) for k in hash_keys(seed))
    if index.dtype == torch.int64 and index.numel():
        high = (index >> 32) & MASK32
        # On CPU take the per-element keys only when some index needs them (a host read is
        # free there); on CUDA always compute them rather than sync the host.
        if index.is_cuda or bool((high != 0).any()):
            wide_k0, wide_k1 = _keys_of_high(seed, high)
            wide = high != 0
            k0 = torch.where(wide, wide_k0, torch.full_like(wide_k0, k0))
            k1 = torch.where(wide, wide_k1, torch.full_like(wide_k1, k1))
    _keyed_triple32_(x, k0, k1)
    x >>= DRAW_SHIFT
    x &= (1 << DRAW_BITS) - 1
    return x


def ratio_threshold(ratio: torch.Tensor) -> torch.Tensor:
    """int32 threshold T with P(draw < T) = (1 + r) / 2 exactly: T = fl(1 + r) * 2**24, clamped to [0, 2**25].

    fl(1 + r) is always a multiple of 2**-24 for a float32 r >= -1 (for 1 + r >= 1/2 its ulp is
    at least 2**-24; below, r < -1/2 has ulp 2**-24 and 1 + r is exact), so T is an integer and
    P(draw < T) = T / 2**25 = fl(1 + r) / 2: the bit is unbiased for fl(1 + r), i.e. E[2 bit - 1]
    = fl(1 + r) - 1, which differs from r only by that one rounding. NaN (and 1 + r <= 0) gives 0.

    Example::
        >>> ratio_threshold(torch.tensor([-1.0, 0.0, 1.0, float("nan")])).tolist()
        [0, 16777216, 33554432, 0]
    """
    one_plus = ratio.to(torch.float32) + 1.0
    one_plus = torch.where(one_plus > 0, one_plus, torch.zeros_like(one_plus)).clamp_max(2.0)
    return (one_plus * float(1 << (DRAW_BITS - 1))).to(torch.int32)


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
) -> torch.Tensor:
    """Birder's per-worker step on one chunk: update m and b in place, binary-randomise m / b, pack.

    g_D: gradient [D] (fp32, bf16 or fp16); m_T, b_T: fp32 canonical state,
    read and written at canon(j) - state_offset (state_offset is 0 when m_T
    holds the whole model; tests use it to reach canonical indices past 2**32
    without allocating them); mask_T: bool [T] (True = received a gradient) or
    None; used_P: uint8/bool [P] or None; flag: uint8 [1] or None.

    For active and finite elements: m = fl(fl(beta m) + fl((1 - beta) g)),
    b = fl(fl(beta b) + fl((1 - beta) |g|)) (max with the old b if amsgrad);
    all other elements keep m and b. r = m / b (0 where b <= 0); bit j is 1 iff
    j is active, g[j] is finite and draw(canon(j), seed) < ratio_threshold(r), i.e. with
    probability fl(1 + r) / 2 exactly.
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
    beta_f, one_minus_beta_f = as_float32(beta), as_float32(1.0 - float(beta))
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
    b_new = b * beta_f + g.abs() * one_minus_beta_f
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
    ratio = torch.where(b <= 0, torch.zeros_like(m), m / b)
    bits = update & (draw(canon, seed) < ratio_threshold(ratio))
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
    """Exact counts in [0, N] -> 1 bit each, 1 with probability count / N to within 2**-25.

    bit i = draw(canon(first + i), seed) * N < clamp(count, 0, N) * 2**25, in exact integer
    arithmetic, i.e. draw < ceil(count * 2**25 / N): P(bit) = ceil(count * 2**25 / N) / 2**25,
    which is count / N exactly when N is a power of two (<= 2**25) or count is 0 or N, and at
    most 2**-25 above it otherwise (no float division: the same bits on every device).
    counts_C: integer [C], the counts of chunk positions first .. first + C - 1 (positions at
    or past D are padding with count 0, so bit 0). Returns uint8 [ceil(C / 8)].

    Example::
        >>> starts, canon = index_map([3])
        >>> bits = requantize(torch.tensor([4, 0, 2]), 4, starts, canon, 0, seed=3)
        >>> unpack_bits(bits, 3).tolist()[:2]   # count 0 or N: deterministic
        [1, 0]
    """
    check_rows(num_rows)
    canon, _ = canonical_index(seg_starts, seg_canon, first, counts_C.numel())
    counts = counts_C.reshape(-1).to(torch.int64).clamp(0, int(num_rows))
    return pack_bits(draw(canon, seed).to(torch.int64) * int(num_rows) < counts << DRAW_BITS)


MAX_ROWS = (1 << 31) - 1  # counts are int32; draw * N stays below 2**56 in int64


def check_rows(num_rows: int) -> None:
    """requantize's N: at least one counted row, at most MAX_ROWS."""
    if not 0 < int(num_rows) <= MAX_ROWS:
        raise ValueError(f"num_rows={num_rows}: expected 1 .. {MAX_ROWS} counted rows")


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
    check_block(block)
    rows = bits_NB.shape[0]
    nblocks = num_blocks(numel, block)
    padded = nblocks * block
    if bits_NB.dim() != 2 or bits_NB.shape[1] != padded // 8 or tuple(scales_NS.shape) != (rows, nblocks):
        raise ValueError(f"bits shape={list(bits_NB.shape)}, scales shape={list(scales_NS.shape)}: expected "
                         f"[N, {padded // 8}] and [N, {nblocks}] for numel={numel}, block={block}")
    if rows == 0:
        raise ValueError("onebit_decode needs at least one row")
    signs = unpack_bits(bits_NB, padded).view(rows, nblocks, block) != 0
    z = torch.zeros(nblocks, block, dtype=torch.float32, device=bits_NB.device)
    for i in range(rows):
        c = scales_NS[i].to(torch.float32).view(nblocks, 1)
        z = z + torch.where(signs[i], c, -c)
    z = z * as_float32(1.0 / rows)
    flips = rht_signs(padded, seed, device=bits_NB.device)
    return _rotate(z, flips, transpose=True).reshape(-1)[:numel]
