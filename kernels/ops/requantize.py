"""Re-quantize exact counts to 1 bit: bit 1 with probability count / N (unbiased for the mean).

Used for the 1-bit phase 2 of the two-phase and hierarchical collectives.
Same counter-based draw as :mod:`kernels.ops.compress`, so the torch and Triton
paths agree bit for bit. Traffic: 4 bytes of count and 4 of index read, 1/8
written per element. Contract: :func:`kernels.reference.requantize`.

Legend: D elements, B = ceil(D / 8) bytes, N rows that were counted.
"""

import torch
import triton
import triton.language as tl

from kernels.ops import _launch
from kernels.ops.uniform_hash import uniform_from_index


@triton.autotune(
    configs=_launch.byte_block_configs(),
    key=["size_class"],
    prune_configs_by={"early_config_prune": _launch.keep_default_when_interpreting},
)
@triton.jit(do_not_specialize=["num_rows", "seed_lo", "seed_hi"])
def _requantize_kernel(
    counts_ptr,  # [D] integer counts in [0, N], read
    index_ptr,  # [D] int32 canonical indices (the hash counter of each draw)
    out_ptr,  # [B] uint8 packed bits, written (padding bits 0)
    numel,  # D
    num_bytes,  # B
    num_rows,  # N
    seed_lo,  # int32 bits of seed & 0xFFFFFFFF
    seed_hi,  # int32 bits of seed >> 32
    size_class,  # autotune key only: ceil(log2(D))
    BLOCK_BYTES: tl.constexpr,  # output bytes per program (8 elements each)
):
    byte = tl.program_id(0) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    offsets = byte[:, None] * 8 + bit[None, :]
    in_range = offsets < numel

    counts = tl.load(counts_ptr + offsets, mask=in_range, other=0)
    # div_rn: IEEE division as the reference's '/', so count == N gives exactly 1 on GPU too.
    probability = tl.div_rn(counts.to(tl.float32), num_rows.to(tl.float32))
    index = tl.load(index_ptr + offsets, mask=in_range, other=0)
    bits = (uniform_from_index(index, seed_lo, seed_hi) < probability) & in_range
    packed = tl.sum(bits.to(tl.int32) << bit[None, :], axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < num_bytes)


def requantize(counts: torch.Tensor, num_rows: int, index: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Triton twin of :func:`kernels.reference.requantize`: int [D] -> uint8 [ceil(D / 8)].

    Example::
        >>> counts = torch.tensor([4, 0, 2], device="cuda")
        >>> index = torch.arange(3, dtype=torch.int32, device="cuda")
        >>> bits = requantize(counts, 4, index, seed=3)
        >>> kernels.reference.unpack_bits(bits, 3).tolist()[:2]   # count 0 or N: deterministic
        [1, 0]
    """
    numel = counts.numel()
    _launch.check_numel(numel)
    _launch.check_same_numel("index", index, numel)
    if num_rows <= 0:
        raise ValueError(f"num_rows={num_rows}: expected at least one counted row")
    num_bytes = (numel + 7) // 8
    out = torch.empty(num_bytes, dtype=torch.uint8, device=counts.device)
    if numel == 0:
        return out
    counts_flat = counts.reshape(-1).contiguous()
    if counts_flat.dtype not in (torch.int32, torch.int64):
        counts_flat = counts_flat.to(torch.int32)
    index_flat = index.reshape(-1).to(torch.int32).contiguous()
    seed_lo, seed_hi = _launch.seed_halves(seed)
    grid = lambda meta: (triton.cdiv(num_bytes, meta["BLOCK_BYTES"]),)  # noqa: E731
    _requantize_kernel[grid](
        counts_flat, index_flat, out, numel, num_bytes, int(num_rows), seed_lo, seed_hi, _launch.size_class(numel)
    )
    return out
