"""Exact counts -> K bit planes (the exact phase-2 payload of the two-phase collective).

Plane j is the packed bit array of bit j of every count, so a count in
[0, N] costs K = ceil(log2(N + 1)) bits. Each program reads a
[BLOCK_BYTES, 8] tile of counts once and writes one byte per plane: 4 bytes
read (int32) and K / 8 written per element. Contract:
:func:`dist_supernet.kernels.reference.pack_counts`; the inverse lives in
:mod:`dist_supernet.kernels.ops.unpack_planes`.

Legend: D elements, K planes, B = ceil(D / 8) bytes per plane.
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels.ops import _launch


@triton.jit
def _pack_counts_kernel(
    counts_ptr,  # [D] integer counts (int32 or int64), read
    planes_ptr,  # [K, B] uint8 bit planes, written
    numel,  # D
    num_bytes,  # B, also the stride between planes
    num_planes,  # K
    BLOCK_BYTES: tl.constexpr,  # bytes of each plane per program (8 elements each)
):
    byte, bit, offsets, in_range, byte_in_range = _launch.byte_tile(numel, BLOCK_BYTES)

    counts = tl.load(counts_ptr + offsets, mask=in_range, other=0)
    plane_ptr = planes_ptr
    for plane in range(num_planes):
        plane_bits = ((counts >> plane) & 1).to(tl.int32)
        packed = tl.sum(plane_bits << bit[None, :], axis=1)
        tl.store(plane_ptr + byte, packed.to(tl.uint8), mask=byte_in_range)
        plane_ptr += num_bytes  # a pointer step: plane * num_bytes would overflow int32


def pack_counts(counts_D: torch.Tensor, num_planes: int) -> torch.Tensor:
    """Triton twin of :func:`dist_supernet.kernels.reference.pack_counts`: int [D] -> uint8 [K, ceil(D / 8)].

    Example::
        >>> pack_counts(torch.tensor([3, 0, 2], device="cuda"), 2).tolist()
        [[1], [5]]
    """
    numel = counts_D.numel()
    _launch.check_numel(numel)
    if counts_D.dtype.is_floating_point or counts_D.dtype == torch.bool:
        raise ValueError(f"counts_D dtype={counts_D.dtype}: expected an integer dtype")
    num_bytes = (numel + 7) // 8
    planes = torch.empty((num_planes, num_bytes), dtype=torch.uint8, device=counts_D.device)
    if numel == 0 or num_planes == 0:
        return planes
    counts = _launch.as_counts(counts_D)
    device, dtype = counts.device, counts.dtype

    def warm():  # the same key on dummies (for _launch.tune_missed)
        pack_counts(torch.zeros(_launch.dummy_numel(numel), dtype=dtype, device=device), num_planes)

    _launch.launch(_pack_counts_kernel, numel, (counts, planes, numel, num_bytes, num_planes), device=device,
                   loop_bounds=(num_planes,), warm=warm)
    return planes
