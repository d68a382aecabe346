"""Triton unpack_mean / unpack_counts vs the torch reference: exact counts and means, masks, odd sizes."""

import pytest
import torch

from kernels import reference as ref

ODD_SIZES = [1, 31, 33, 4097]


def _rows(num_rows, numel, device):
    return torch.randint(0, 256, (num_rows, ref.num_bytes(numel)), dtype=torch.uint8, device=device)


@pytest.mark.parametrize("numel", ODD_SIZES)
@pytest.mark.parametrize("num_rows", [1, 3, 8])
def test_counts_and_mean_exact(tk, device, numel, num_rows):
    rows = _rows(num_rows, numel, device)
    assert torch.equal(tk.unpack_counts(rows, numel), ref.unpack_counts(rows, numel))
    # (2c - N) / N with IEEE division on both sides: exact.
    assert torch.equal(tk.unpack_mean(rows, numel), ref.unpack_mean(rows, numel))


@pytest.mark.parametrize("numel", [31, 4097])
def test_all_zero_and_all_one_rows(tk, device, numel):
    num_rows = 5
    ones = torch.stack([ref.pack_bits(torch.ones(numel, dtype=torch.bool, device=device))] * num_rows)
    zeros = torch.zeros_like(ones)
    assert torch.equal(tk.unpack_counts(ones, numel), torch.full((numel,), num_rows, dtype=torch.int32, device=device))
    assert torch.equal(tk.unpack_counts(zeros, numel), torch.zeros(numel, dtype=torch.int32, device=device))
    assert torch.equal(tk.unpack_mean(ones, numel), torch.ones(numel, device=device))
    assert torch.equal(tk.unpack_mean(zeros, numel), -torch.ones(numel, device=device))


@pytest.mark.parametrize("numel", [33, 4097])
def test_mask_zeroes_mean(tk, device, numel):
    rows = _rows(4, numel, device)
    mask = torch.rand(numel, device=device) < 0.5
    mean = tk.unpack_mean(rows, numel, mask=mask)
    assert torch.equal(mean, ref.unpack_mean(rows, numel, mask=mask))
    assert torch.equal(mean[~mask], torch.zeros(int((~mask).sum()), device=device))


def test_strided_rows_and_wide_rows(tk, device):
    # Rows wider than ceil(D / 8) (e.g. a padded all-gather buffer) and a row view with a stride.
    numel = 45
    wide = _rows(6, 64, device)
    assert torch.equal(tk.unpack_counts(wide, numel), ref.unpack_counts(wide, numel))
    every_other = wide[::2]
    assert torch.equal(tk.unpack_mean(every_other, numel), ref.unpack_mean(every_other, numel))


def test_empty(tk, device):
    rows = torch.zeros((3, 0), dtype=torch.uint8, device=device)
    assert tk.unpack_mean(rows, 0).shape == (0,)
    assert tk.unpack_counts(rows, 0).dtype == torch.int32


def test_too_few_bytes_raises(tk, device):
    with pytest.raises(ValueError, match="too few"):
        tk.unpack_mean(torch.zeros((2, 1), dtype=torch.uint8, device=device), 9)
