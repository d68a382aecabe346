"""The torch reference itself: bit layout round trips, the hash, r = 0 where b = 0.

These run without triton; the Triton kernels are checked against this file's subject.
"""

import numpy as np
import pytest
import torch

from kernels import reference as ref


def _lowbias32_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _uniform_np(index: np.ndarray, seed: int) -> np.ndarray:
    """The documented stream in plain numpy uint32 arithmetic."""
    h = _lowbias32_np(index.astype(np.int64).astype(np.uint32) ^ np.uint32(seed & 0xFFFFFFFF))
    h = _lowbias32_np(h ^ np.uint32((seed >> 32) & 0xFFFFFFFF))
    return (h >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


@pytest.mark.parametrize("seed", [0, 1, 0x7FFFFFFF, 0x80000000, 0xDEADBEEFCAFEBABE, 2**64 - 1])
def test_uniform_equals_numpy_uint32(seed):
    index = torch.cat([torch.arange(-50, 50, dtype=torch.int32), torch.randint(-(2**31), 2**31 - 1, (2000,), dtype=torch.int32)])
    expected = _uniform_np(index.numpy(), seed)
    assert np.array_equal(ref.uniform(index, seed).numpy(), expected)


def test_uniform_range_and_mean():
    u = ref.uniform(torch.arange(1 << 16, dtype=torch.int32), seed=12345)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # mean of 65536 U(0,1): sigma = sqrt(1/12 / 65536) = 1.1e-3; bound 5 sigma
    assert abs(float(u.mean()) - 0.5) < 5 * 1.13e-3


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 4097])
def test_pack_unpack_round_trip(numel):
    bits = torch.rand(numel) < 0.5
    packed = ref.pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (ref.num_bytes(numel),)
    assert torch.equal(ref.unpack_bits(packed, numel).bool(), bits)
    if numel % 8:  # padding bits past numel are 0
        assert int(packed[-1]) >> (numel % 8) == 0


def test_bit_layout_lsb_first():
    bits = torch.zeros(16, dtype=torch.bool)
    bits[0] = bits[3] = bits[9] = True
    assert ref.pack_bits(bits).tolist() == [0b1001, 0b10]


@pytest.mark.parametrize("numel", [0, 1, 9, 4097])
def test_pack_counts_round_trip(numel):
    num_rows = 11
    counts = torch.randint(0, num_rows + 1, (numel,), dtype=torch.int32)
    planes = ref.pack_counts(counts, ref.count_bits(num_rows))
    assert planes.shape == (4, ref.num_bytes(numel))
    assert torch.equal(ref.unpack_planes(planes, numel), counts)
    batched = torch.stack([planes, planes])
    assert torch.equal(ref.unpack_planes(batched, numel), torch.stack([counts, counts]))


def test_zero_b_gives_r_zero_without_nan():
    numel = 1 << 14
    g, m, b = torch.zeros(numel), torch.zeros(numel), torch.zeros(numel)
    bits = ref.compress(g, m, b, torch.arange(numel, dtype=torch.int32), beta=0.9, seed=5)
    assert not torch.isnan(m).any() and not torch.isnan(b).any()
    assert torch.equal(m, torch.zeros(numel)) and torch.equal(b, torch.zeros(numel))
    # r = 0 -> probability 1/2; 16384 fair draws: sigma = 0.5 / 128, bound 5 sigma
    ones = ref.unpack_bits(bits, numel).float().mean().item()
    assert abs(ones - 0.5) < 5 * 0.5 / 128


def test_masked_compress_keeps_state_and_emits_zero():
    numel = 33
    g = torch.randn(numel)
    m, b = torch.randn(numel) * 0.1, torch.rand(numel) + 0.2
    mask = torch.arange(numel) % 3 == 0
    m0, b0 = m.clone(), b.clone()
    bits = ref.unpack_bits(ref.compress(g, m, b, torch.arange(numel, dtype=torch.int32), beta=0.9, seed=1, mask=mask), numel)
    assert torch.equal(m[~mask], m0[~mask]) and torch.equal(b[~mask], b0[~mask])
    assert not torch.equal(m[mask], m0[mask])
    assert int(bits[~mask].sum()) == 0


def test_unpack_mean_and_counts_extremes():
    numel, num_rows = 13, 5
    rows = torch.stack([ref.pack_bits(torch.ones(numel, dtype=torch.bool))] * num_rows)
    assert torch.equal(ref.unpack_counts(rows, numel), torch.full((numel,), num_rows, dtype=torch.int32))
    assert torch.equal(ref.unpack_mean(rows, numel), torch.ones(numel))
    assert torch.equal(ref.unpack_mean(torch.zeros_like(rows), numel), -torch.ones(numel))


def test_apply_packed_equals_unpack_then_apply():
    numel, num_rows = 37, 3
    rows = torch.randint(0, 256, (num_rows, ref.num_bytes(numel)), dtype=torch.uint8)
    mask = torch.rand(numel) < 0.7
    x = torch.randn(numel)
    expected = x.clone()
    update = ref.unpack_mean(rows, numel, mask=mask)
    ref.apply_update_(expected, update, lr=0.1, weight_decay=0.01, mask=mask)
    x0 = x.clone()
    ref.apply_packed_(x, rows, lr=0.1, weight_decay=0.01, mask=mask)
    assert torch.equal(x, expected)
    assert torch.equal(x[~mask], x0[~mask])
