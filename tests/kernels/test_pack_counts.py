"""Triton pack_counts / unpack_planes vs the torch reference: exact planes, batch dims, odd sizes."""

import pytest
import torch

from kernels import reference as ref

ODD_SIZES = [1, 31, 33, 4097]


@pytest.mark.parametrize("numel", ODD_SIZES)
@pytest.mark.parametrize("num_rows", [1, 7, 8, 255])
def test_pack_counts_exact(tk, device, numel, num_rows):
    num_planes = ref.count_bits(num_rows)
    counts = torch.randint(0, num_rows + 1, (numel,), dtype=torch.int32, device=device)
    counts[:2] = torch.tensor([0, num_rows], dtype=torch.int32)[: min(2, numel)].to(device)
    planes = tk.pack_counts(counts, num_planes)
    assert planes.shape == (num_planes, ref.num_bytes(numel)) and planes.dtype == torch.uint8
    assert torch.equal(planes, ref.pack_counts(counts, num_planes))
    assert torch.equal(tk.unpack_planes(planes, numel), counts)


def test_int64_counts(tk, device):
    counts = torch.randint(0, 16, (77,), device=device)  # int64, as a torch sum returns
    assert torch.equal(tk.pack_counts(counts, 4), ref.pack_counts(counts, 4))


@pytest.mark.parametrize("numel", [33, 4097])
def test_unpack_planes_batched(tk, device, numel):
    planes = torch.randint(0, 256, (2, 3, 5, ref.num_bytes(numel)), dtype=torch.uint8, device=device)
    counts = tk.unpack_planes(planes, numel)
    assert counts.shape == (2, 3, numel)
    assert torch.equal(counts, ref.unpack_planes(planes, numel))


def test_empty(tk, device):
    empty = torch.empty(0, dtype=torch.int32, device=device)
    assert tk.pack_counts(empty, 3).shape == (3, 0)
    assert tk.unpack_planes(torch.empty((2, 3, 0), dtype=torch.uint8, device=device), 0).shape == (2, 0)
    assert tk.pack_counts(torch.ones(9, dtype=torch.int32, device=device), 0).shape == (0, 2)
