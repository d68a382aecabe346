"""K bit planes -> exact int32 counts, the inverse of :mod:`dist_supernet.kernels.ops.pack_counts`.

Planes may carry leading batch dims ([..., K, B], e.g. one set of planes per
rank after an all-gather); each program handles BLOCK_BYTES bytes of one
batch entry and sums its K planes in registers: K / 8 bytes read and 4
written per element. Contract: :func:`dist_supernet.kernels.reference.unpack_planes`.

Legend: M batch entries (product of the leading dims), K planes, B bytes per
plane (B >= ceil(D / 8)), D elements.
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _launch


@triton.jit
def _unpack_planes_kernel(
    planes_ptr,  # [M, K, B] uint8 bit planes, contiguous
    out_ptr,  # [M, D] int32 counts, written
    numel,  # D
    num_bytes,  # B, the stride between planes
    num_planes,  # K
    BLOCK_BYTES: tl.constexpr,  # bytes of each plane per program (8 elements each)
):
    batch = tl.program_id(1).to(tl.int64)
    byte, bit, offsets, in_range, byte_in_range = _launch.byte_tile(numel, BLOCK_BYTES)

    count = tl.zeros((BLOCK_BYTES, 8), dtype=tl.int32)
    plane_ptr = planes_ptr + batch * num_planes * num_bytes
    for plane in range(num_planes):
        row = tl.load(plane_ptr + byte, mask=byte_in_range, other=0).to(tl.int32)
        count += ((row[:, None] >> bit[None, :]) & 1) << plane
        plane_ptr += num_bytes
    tl.store(out_ptr + batch * numel + offsets, count, mask=in_range)


def unpack_planes(planes_KB: torch.Tensor, numel: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`dist_supernet.kernels.reference.unpack_planes`: uint8 [..., K, B] -> int32 [..., numel].

    Example::
        >>> unpack_planes(torch.tensor([[1], [5]], dtype=torch.uint8, device="cuda"), 3).tolist()
        [3, 0, 2]
    """
    _launch.check_numel(numel)
    if planes_KB.dim() < 2 or planes_KB.dtype != torch.uint8:
        raise ValueError(f"planes_KB: expected uint8 [..., K, B], got {planes_KB.dtype} {list(planes_KB.shape)}")
    *batch_shape, num_planes, num_bytes = planes_KB.shape
    if num_bytes * 8 < numel:
        raise ValueError(f"planes_KB has {num_bytes} bytes per plane, too few for numel={numel}")
    out = reference.check_out(out, (*batch_shape, numel), torch.int32, planes_KB.device)
    if out is None:
        out = torch.empty((*batch_shape, numel), dtype=torch.int32, device=planes_KB.device)
    num_batch = out.numel() // numel if numel else 0
    if num_batch == 0 or num_planes == 0:
        return out.zero_()
    device = planes_KB.device

    def warm():  # the same key on dummies (for _launch.tune_missed)
        n = _launch.dummy_numel(numel)
        unpack_planes(torch.zeros((num_batch, num_planes, (n + 7) // 8), dtype=torch.uint8, device=device), n)

    _launch.launch(_unpack_planes_kernel, numel, (planes_KB.contiguous(), out, numel, num_bytes, num_planes),
                   device=device, num_batch=num_batch, loop_bounds=(num_planes,), warm=warm)
    return out
