"""Unpack-and-average: N packed rows of +-1 -> the float32 mean (2 * count - N) / N.

Each program popcounts bit i of every row in registers (a loop over the N rows, each a
coalesced read of BLOCK_BYTES bytes), as :mod:`dist_supernet.kernels.ops.unpack_counts`, and writes the
mean; the counts never touch memory. Traffic: N / 8 bytes read and 4 bytes written per
element (+1 byte for the mask). Contract: :func:`dist_supernet.kernels.reference.unpack_mean`.

Legend: N rows, D elements, B bytes per row (B >= ceil(D / 8)).
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _launch
from dist_supernet.kernels.ops.unpack_counts import check_rows, count_rows


@triton.jit
def _unpack_mean_kernel(
    packed_ptr,  # [N, B] uint8 packed rows, row r starts at packed_ptr + r * row_stride
    mask_ptr,  # [D] uint8 view of the bool mask; unused unless HAS_MASK
    out_ptr,  # [D] float32 mean, written
    numel,  # D
    num_rows,  # N
    row_stride,  # elements (bytes) between rows of packed
    HAS_MASK: tl.constexpr,  # 0 where the mask is False
    BLOCK_BYTES: tl.constexpr,  # bytes of each row per program (8 elements each)
):
    byte, bit, offsets, in_range, byte_in_range = _launch.byte_tile(numel, BLOCK_BYTES)

    count = count_rows(packed_ptr, byte, bit, byte_in_range, num_rows, row_stride, BLOCK_BYTES)
    # div_rn: IEEE division as the reference's '/', not Triton's approximate GPU default.
    mean = tl.div_rn((count * 2 - num_rows).to(tl.float32), num_rows.to(tl.float32))
    if HAS_MASK:
        keep = tl.load(mask_ptr + offsets, mask=in_range, other=0) != 0
        mean = tl.where(keep, mean, 0.0)
    tl.store(out_ptr + offsets, mean, mask=in_range)


def unpack_mean(packed_NB: torch.Tensor, numel: int, *, mask: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`dist_supernet.kernels.reference.unpack_mean`: uint8 [N, B] -> float32 [numel].

    Example::
        >>> rows = torch.tensor([[0b101], [0b001]], dtype=torch.uint8, device="cuda")
        >>> unpack_mean(rows, 3).tolist()
        [1.0, -1.0, 0.0]
    """
    packed_NB = check_rows(packed_NB, numel)
    out = reference.check_out(out, (numel,), torch.float32, packed_NB.device)
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=packed_NB.device)
    if numel == 0:
        return out
    if packed_NB.shape[0] == 0:
        raise ValueError("packed_NB has no rows: the mean of 0 rows is undefined")
    mask_u8 = _launch.mask_bytes(mask, numel)
    num_rows, device, has_mask = packed_NB.shape[0], packed_NB.device, mask_u8 is not None

    def warm():  # the same key on dummies (for _launch.tune_missed)
        n = _launch.dummy_numel(numel)
        unpack_mean(torch.zeros((num_rows, (n + 7) // 8), dtype=torch.uint8, device=device), n,
                    mask=torch.ones(n, dtype=torch.uint8, device=device) if has_mask else None)

    _launch.launch(
        _unpack_mean_kernel, numel,
        (packed_NB, out if mask_u8 is None else mask_u8, out, numel, num_rows, packed_NB.stride(0)),
        device=device, constexprs=dict(HAS_MASK=has_mask), loop_bounds=(num_rows,), warm=warm,
    )
    return out
