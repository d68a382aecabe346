"""Triton requantize vs the torch reference: counts 0 and N exact, random bits equal, unbiased."""

import pytest
import torch

from kernels import reference as ref

ODD_SIZES = [1, 31, 33, 4097]
MISMATCH_FRACTION = 1e-4  # random bits within fp32 rounding of their threshold (GPU only)


@pytest.mark.parametrize("numel", ODD_SIZES)
def test_counts_zero_and_n_exact(tk, device, numel):
    num_rows = 6
    full = torch.rand(numel, device=device) < 0.5
    counts = torch.where(full, num_rows, 0).to(torch.int32)
    index = torch.arange(numel, dtype=torch.int32, device=device)
    bits = tk.requantize(counts, num_rows, index, seed=77)
    assert torch.equal(bits, ref.pack_bits(full))
    assert torch.equal(bits, ref.requantize(counts, num_rows, index, seed=77))


@pytest.mark.parametrize("numel", ODD_SIZES + [20000])
@pytest.mark.parametrize("seed", [0, 0xFFFF_FFFF_0000_0001])
def test_random_counts_match_reference(tk, device, numel, seed):
    num_rows = 7
    counts = torch.randint(0, num_rows + 1, (numel,), device=device)
    index = torch.randperm(numel, device=device).to(torch.int32) * 3
    bits_t = tk.requantize(counts, num_rows, index, seed=seed)
    bits_r = ref.requantize(counts, num_rows, index, seed=seed)
    mismatches = int((ref.unpack_bits(bits_t, numel) != ref.unpack_bits(bits_r, numel)).sum())
    assert mismatches <= MISMATCH_FRACTION * numel
    if device == "cpu":
        assert torch.equal(bits_t, bits_r)


def test_unbiased(tk, device):
    # P(bit) = c / N for c in 0..N: 4096 elements per count, 4 seeds -> n = 16384 draws per count;
    # sigma = sqrt(p (1 - p) / n); bound 5 sigma (+1e-6 for the 2**-24 resolution of the draw).
    num_rows, per_count, num_seeds = 7, 4096, 4
    counts = torch.arange(num_rows + 1, device=device).repeat_interleave(per_count)
    numel = counts.numel()
    index = torch.arange(numel, dtype=torch.int32, device=device)
    total = torch.zeros(numel, device=device)
    for seed in range(num_seeds):
        total += ref.unpack_bits(tk.requantize(counts, num_rows, index, seed=seed + 1000), numel).float()
    p = torch.arange(num_rows + 1, device=device) / num_rows
    mean = (total / num_seeds).view(-1, per_count).mean(dim=1)
    sigma = (p * (1 - p) / (per_count * num_seeds)).sqrt()
    assert ((mean - p).abs() <= 5 * sigma + 1e-6).all(), (mean - p, sigma)


def test_empty_and_bad_rows(tk, device):
    empty = torch.empty(0, dtype=torch.int32, device=device)
    assert tk.requantize(empty, 3, empty, seed=0).shape == (0,)
    with pytest.raises(ValueError, match="num_rows"):
        tk.requantize(torch.ones(4, dtype=torch.int32, device=device), 0, torch.arange(4, dtype=torch.int32, device=device), seed=0)


@pytest.mark.parametrize("seed", [0, 1, 0x80000000, 0xDEADBEEFCAFEBABE, 2**64 - 1])
def test_uniform_hash_matches_reference(tk, device, seed):
    index = torch.randint(-(2**31), 2**31 - 1, (3001,), dtype=torch.int32, device=device)
    assert torch.equal(tk.uniform_hash(index, seed), ref.uniform(index, seed))
