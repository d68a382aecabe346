"""requantize and the uniform draw on every backend: exact bits, 64-bit indices, unbiasedness."""

import numpy as np
import pytest
import torch

from dist_supernet.kernels import reference as ref

from . import oracle
from .conftest import chunk

ODD_SIZES = [0, 1, 31, 33, 4097]


@pytest.mark.parametrize("seed", [0, 0x80000000, 0xDEADBEEFCAFEBABE, 2**64 - 1])
def test_uniform_exact(backend, seed):
    device = backend.device
    index64 = torch.cat([torch.arange(2**32 - 40, 2**32 + 40), torch.randint(-(2**62), 2**62, (3001,)),
                         torch.tensor([2**63 - 1, -(2**63), -1, 0])]).to(device)
    index32 = torch.randint(-(2**31), 2**31 - 1, (3001,), dtype=torch.int32).to(device)
    for index in (index64, index32):
        u = backend.uniform(index, seed)
        assert np.array_equal(u.cpu().numpy(), oracle.uniform(index.cpu().numpy(), seed))


@pytest.mark.parametrize("numel", ODD_SIZES)
def test_counts_zero_and_n_exact(backend, numel):
    device = backend.device
    full = torch.rand(numel, device=device) < 0.5
    counts = torch.where(full, 6, 0).to(torch.int32)
    starts, canon = chunk([numel], device=device)
    bits = backend.requantize(counts, 6, starts, canon, 0, seed=77)
    assert torch.equal(bits, ref.pack_bits(full))


@pytest.mark.parametrize("numel", ODD_SIZES + [20000])
@pytest.mark.parametrize("seed", [0, 0xFFFF_FFFF_0000_0001])
def test_random_counts_exact(compiled, numel, seed):
    device = compiled.device
    counts = torch.randint(0, 8, (numel,), device=device)  # int64, as a torch sum returns
    starts, canon = chunk([numel // 3, 0, numel - numel // 3], [2**32 - 7, 5, 123], device=device)
    for first in (0, 8 * (numel // 16)):
        part = counts[: numel - first]
        bits = compiled.requantize(part, 7, starts, canon, first, seed=seed)
        assert torch.equal(bits, ref.requantize(part, 7, starts, canon, first, seed=seed))
        assert torch.equal(compiled.requantize(part.int(), 7, starts, canon, first, seed=seed), bits)


def test_padding_past_the_chunk(compiled):
    # A collective's last chunk runs past D: counts there are 0, so bits are 0 whatever the index.
    device = compiled.device
    starts, canon = chunk([10, 0], [2**40, 3], device=device)
    counts = torch.cat([torch.full((6,), 2), torch.zeros(10, dtype=torch.int64)]).to(device)
    bits = compiled.requantize(counts, 2, starts, canon, 4, seed=1)
    assert torch.equal(bits, ref.requantize(counts, 2, starts, canon, 4, seed=1))
    assert ref.unpack_bits(bits, 16).tolist() == [1] * 6 + [0] * 10


def test_unbiased(backend):
    # P(bit) = c / N for c in 0..N: 2048 elements per count, 4 seeds -> n = 8192 draws per count;
    # sigma = sqrt(p (1 - p) / n); bound 5 sigma (+1e-6 for the 2**-24 resolution of the draw).
    device = backend.device
    num_rows, per_count, num_seeds = 7, 2048, 4
    counts = torch.arange(num_rows + 1, device=device).repeat_interleave(per_count)
    numel = counts.numel()
    starts, canon = chunk([numel], [2**33], device=device)
    total = torch.zeros(numel, device=device)
    for seed in range(num_seeds):
        total += ref.unpack_bits(backend.requantize(counts, num_rows, starts, canon, 0, seed=seed + 1000), numel).float()
    p = torch.arange(num_rows + 1, device=device) / num_rows
    mean = (total / num_seeds).view(-1, per_count).mean(dim=1)
    sigma = (p * (1 - p) / (per_count * num_seeds)).sqrt()
    assert ((mean - p).abs() <= 5 * sigma + 1e-6).all(), (mean - p, sigma)


def test_empty_and_bad_rows(backend):
    device = backend.device
    starts, canon = chunk([4], device=device)
    empty = torch.empty(0, dtype=torch.int32, device=device)
    assert backend.requantize(empty, 3, starts, canon, 0, seed=0).shape == (0,)
    with pytest.raises(ValueError, match="num_rows"):
        backend.requantize(torch.ones(4, dtype=torch.int32, device=device), 0, starts, canon, 0, seed=0)
