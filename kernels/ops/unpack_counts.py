"""Unpack-and-count: N packed rows of +-1 -> exact int32 counts per element.

Each program popcounts bit i of every row in registers (a loop over the N rows, each a
coalesced read of BLOCK_BYTES bytes) and writes the int32 count. Traffic: N / 8 bytes read
and 4 bytes written per element. Contract: :func:`dist_supernet.kernels.reference.unpack_counts`.

Legend: N rows, D elements, B bytes per row (B >= ceil(D / 8)).
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _launch


@triton.jit
def _unpack_counts_kernel(
    packed_ptr,  # [N, B] uint8 packed rows, row r starts at packed_ptr + r * row_stride
    out_ptr,  # [D] int32 counts, written
    numel,  # D
    num_rows,  # N
    row_stride,  # bytes between rows of packed
    BLOCK_BYTES: tl.constexpr,  # bytes of each row per program (8 elements each)
):
    byte, bit, offsets, in_range, byte_in_range = _launch.byte_tile(numel, BLOCK_BYTES)

    count = count_rows(packed_ptr, byte, bit, byte_in_range, num_rows, row_stride, BLOCK_BYTES)
    tl.store(out_ptr + offsets, count, mask=in_range)


@triton.jit
def count_rows(packed_ptr, byte, bit, byte_in_range, num_rows, row_stride, BLOCK_BYTES: tl.constexpr):
    """[BLOCK_BYTES, 8] int32: how many of the N rows have bit ``bit`` of byte ``byte`` set.

    A loop over the rows, each a coalesced read of BLOCK_BYTES bytes, popcounted in registers
    (shared with :mod:`dist_supernet.kernels.ops.unpack_mean`).
    """
    count = tl.zeros((BLOCK_BYTES, 8), dtype=tl.int32)
    row_ptr = packed_ptr
    for _ in range(num_rows):
        row = tl.load(row_ptr + byte, mask=byte_in_range, other=0).to(tl.int32)
        count += (row[:, None] >> bit[None, :]) & 1
        row_ptr += row_stride  # a pointer step: r * row_stride would overflow int32
    return count


def check_rows(packed_NB: torch.Tensor, numel: int) -> torch.Tensor:
    """Validate N packed rows for numel elements; rows with a byte stride are made contiguous."""
    _launch.check_numel(numel)
    if packed_NB.dim() != 2 or packed_NB.dtype != torch.uint8:
        raise ValueError(f"packed_NB: expected uint8 [N, B], got {packed_NB.dtype} {list(packed_NB.shape)}")
    if packed_NB.shape[1] * 8 < numel:
        raise ValueError(f"packed_NB has {packed_NB.shape[1]} bytes per row, too few for numel={numel}")
    return packed_NB if packed_NB.stride(1) == 1 else packed_NB.contiguous()


def unpack_counts(packed_NB: torch.Tensor, numel: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`dist_supernet.kernels.reference.unpack_counts`: uint8 [N, B] -> int32 [numel].

    Example::
        >>> rows = torch.tensor([[0b101], [0b001]], dtype=torch.uint8, device="cuda")
        >>> unpack_counts(rows, 3).tolist()
        [2, 0, 1]
    """
    packed_NB = check_rows(packed_NB, numel)
    out = reference.check_out(out, (numel,), torch.int32, packed_NB.device)
    if out is None:
        out = torch.empty(numel, dtype=torch.int32, device=packed_NB.device)
    if numel == 0 or packed_NB.shape[0] == 0:
        return out.zero_()
    num_rows, device = packed_NB.shape[0], packed_NB.device

    def warm():  # the same key on dummies (for _launch.tune_missed)
        n = _launch.dummy_numel(numel)
        unpack_counts(torch.zeros((num_rows, (n + 7) // 8), dtype=torch.uint8, device=device), n)

    _launch.launch(_unpack_counts_kernel, numel, (packed_NB, out, numel, num_rows, packed_NB.stride(0)), device=device,
                   loop_bounds=(num_rows,), warm=warm)
    return out
