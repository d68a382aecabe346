"""Re-quantize exact counts to 1 bit: bit 1 with probability count / N (unbiased for the mean).

Used for the 1-bit phase 2 of the two-phase and hierarchical collectives. Same counter-based
draw as :mod:`dist_supernet.kernels.ops.compress`, keyed by canon(first + i) from the chunk's index map, so
the torch, numba and Triton paths agree bit for bit. Traffic: 4 bytes of count read, 1/8
written per element. Contract: :func:`dist_supernet.kernels.reference.requantize`.

Legend: C counts, B = ceil(C / 8) bytes, N rows that were counted, P segments.
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _launch
from dist_supernet.kernels.ops._segments import canonical_index
from dist_supernet.kernels.ops.uniform_hash import uniform_from_index


# P varies between the warm-up's dummies and the real chunks: not specialized, so no recompile.
@triton.jit(do_not_specialize=["num_rows", "seed_lo", "seed_hi", "first", "num_segments", "num_steps"])
def _requantize_kernel(
    counts_ptr,  # [C] integer counts in [0, N], read
    seg_starts_ptr,  # [P + 1] int64 chunk-local segment starts
    seg_canon_ptr,  # [P] int64 canonical index of each segment's first element
    out_ptr,  # [B] uint8 packed bits, written (padding bits 0)
    numel,  # C
    num_bytes,  # B
    first,  # chunk position of counts[0]
    num_segments,  # P (0: the position itself is the index)
    num_steps,  # ceil(log2(P))
    num_rows,  # N
    seed_lo,  # int32 bits of seed & 0xFFFFFFFF
    seed_hi,  # int32 bits of seed >> 32
    BLOCK_BYTES: tl.constexpr,  # output bytes per program (8 elements each)
):
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    offsets = byte[:, None] * 8 + bit[None, :]
    in_range = offsets < numel

    counts = tl.load(counts_ptr + offsets, mask=in_range, other=0)
    # div_rn: IEEE division as the reference's '/', so count == N gives exactly 1 on GPU too.
    probability = tl.div_rn(counts.to(tl.float32), num_rows.to(tl.float32))
    if num_segments > 0:
        canon, _ = canonical_index(seg_starts_ptr, seg_canon_ptr, offsets + first, num_segments, num_steps)
    else:
        canon = offsets + first
    bits = (uniform_from_index(canon, seed_lo, seed_hi) < probability) & in_range
    packed = tl.sum(bits.to(tl.int32) << bit[None, :], axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < num_bytes)


def requantize(counts_C, num_rows, seg_starts, seg_canon, first, *, seed):
    """Triton twin of :func:`dist_supernet.kernels.reference.requantize`: int [C] -> uint8 [ceil(C / 8)].

    Example::
        >>> starts, canon = kernels.index_map([3], device="cuda")
        >>> bits = requantize(torch.tensor([4, 0, 2], device="cuda"), 4, starts, canon, 0, seed=3)
        >>> kernels.reference.unpack_bits(bits, 3).tolist()[:2]   # count 0 or N: deterministic
        [1, 0]
    """
    num_segments = reference.check_index_map(seg_starts, seg_canon)
    numel = counts_C.numel()
    _launch.check_numel(numel)
    if num_rows <= 0:
        raise ValueError(f"num_rows={num_rows}: expected at least one counted row")
    num_bytes = (numel + 7) // 8
    out = torch.empty(num_bytes, dtype=torch.uint8, device=counts_C.device)
    if numel == 0:
        return out
    seed_lo, seed_hi = _launch.seed_halves(seed)
    counts = _launch.as_counts(counts_C)
    device, dtype = counts.device, counts.dtype

    def warm():  # the same key on dummies (for _launch.tune_missed)
        n = _launch.dummy_numel(numel)
        requantize(torch.zeros(n, dtype=dtype, device=device), num_rows, *reference.index_map([n], device=device), 0,
                   seed=0)

    _launch.launch(
        _requantize_kernel, numel,
        (counts, seg_starts.contiguous(), seg_canon.contiguous(), out, numel, num_bytes,
         int(first), num_segments, _launch.search_steps(num_segments), int(num_rows), seed_lo, seed_hi),
        device=device, warm=warm,
    )
    return out
