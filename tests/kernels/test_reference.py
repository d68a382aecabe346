"""The torch reference itself, against the independent numpy model (tests/kernels/oracle.py).

The compiled backends are held to the reference elsewhere; here the reference is held to the
contract: the hash (with the 64-bit extension), the bit layout, the index map, the
two-rounding m/b update, the non-finite rule and the decode-and-apply arithmetic.
"""

import numpy as np
import pytest
import torch

from dist_supernet.kernels import reference as ref

from . import oracle

SEEDS = [0, 1, 0x7FFFFFFF, 0x80000000, 0xDEADBEEFCAFEBABE, 2**64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_equals_numpy_model(seed):
    index32 = torch.cat([torch.arange(-50, 50, dtype=torch.int32),
                         torch.randint(-(2**31), 2**31 - 1, (2000,), dtype=torch.int32)])
    assert np.array_equal(ref.uniform(index32, seed).numpy(), oracle.uniform(index32.numpy(), seed))
    index64 = torch.cat([torch.arange(2**32 - 50, 2**32 + 50), torch.randint(-(2**62), 2**62, (2000,)),
                         torch.tensor([2**63 - 1, -(2**63), 2**40, -1])])
    assert np.array_equal(ref.uniform(index64, seed).numpy(), oracle.uniform(index64.numpy(), seed))


def test_uniform_below_2_32_keeps_its_bits_and_above_differs():
    low = torch.arange(1000, dtype=torch.int64)
    assert torch.equal(ref.uniform(low, 9), ref.uniform(low.to(torch.int32), 9))
    assert not torch.equal(ref.uniform(low + 2**32, 9), ref.uniform(low, 9))
    assert not torch.equal(ref.uniform(low + 2**33, 9), ref.uniform(low + 2**32, 9))


def test_uniform_range_and_mean():
    u = ref.uniform(torch.arange(2**32 - 2**15, 2**32 + 2**15), seed=12345)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # mean of 65536 U(0,1): sigma = sqrt(1/12 / 65536) = 1.13e-3; bound 5 sigma
    assert abs(float(u.mean()) - 0.5) < 5 * 1.13e-3


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 4097])
def test_pack_unpack_round_trip(numel):
    bits = torch.rand(numel) < 0.5
    packed = ref.pack_bits(bits)
    assert np.array_equal(packed.numpy(), oracle.pack(bits.numpy()))
    assert torch.equal(ref.unpack_bits(packed, numel).bool(), bits)


def test_bit_layout_lsb_first():
    bits = torch.zeros(16, dtype=torch.bool)
    bits[0] = bits[3] = bits[9] = True
    assert ref.pack_bits(bits).tolist() == [0b1001, 0b10]


@pytest.mark.parametrize("numel", [0, 1, 9, 4097])
def test_pack_counts_round_trip(numel):
    counts = torch.randint(0, 12, (numel,), dtype=torch.int32)
    planes = ref.pack_counts(counts, ref.count_bits(11))
    assert planes.shape == (4, ref.num_bytes(numel))
    assert torch.equal(ref.unpack_planes(planes, numel), counts)
    assert torch.equal(ref.unpack_planes(torch.stack([planes, planes]), numel), torch.stack([counts, counts]))


def test_canonical_index_segments_empty_and_padding():
    starts, canon = ref.index_map([3, 0, 2, 0], [10, 99, 2**32, 7])
    index, seg = ref.canonical_index(starts, canon, 0, 7)
    assert index.tolist()[:5] == [10, 11, 12, 2**32, 2**32 + 1]
    assert seg.tolist()[:5] == [0, 0, 0, 2, 2]
    assert seg.tolist()[5:] == [3, 3]  # padding past D: the last segment
    index, _ = ref.canonical_index(starts, canon, 2, 2)
    assert index.tolist() == [12, 2**32]
    with pytest.raises(ValueError, match="int64"):
        ref.canonical_index(starts.to(torch.int32), canon, 0, 1)
    with pytest.raises(ValueError, match=r"\[P \+ 1\]"):
        ref.canonical_index(starts[:-1], canon, 0, 1)


def _random_state(total, *, zero_every=5):
    b = torch.rand(total) + 0.05
    m = (torch.rand(total) * 2 - 1) * b
    b[::zero_every] = 0.0
    m[::zero_every] = 0.0
    return m, b


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rule", [{}, dict(rms=True, beta2=0.99, ratio_scale=1.3), dict(g_scale=0.3),
                                  dict(rms=True, beta2=0.999, ratio_scale=0.7, g_scale=0.45)])
def test_compress_equals_numpy_model(amsgrad, masked, rule):
    numels, canon_starts = [700, 0, 33, 4097, 1], [5000, 0, 10, 100, 4999]
    total, numel = 5700, sum(numels)
    g = torch.randn(numel)
    g[[3, 800, 4000]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    m_T, b_T = _random_state(total)
    mask_T = (torch.rand(total) < 0.7) if masked else None
    used_P = torch.tensor([1, 1, 0, 1, 1], dtype=torch.uint8) if masked else None
    starts, canon = ref.index_map(numels, canon_starts)
    expected = oracle.compress(g.numpy(), m_T.numpy(), b_T.numpy(), numels, canon_starts, beta=0.93, seed=0xABCDEF0123,
                               mask_T=None if mask_T is None else mask_T.numpy(),
                               used_P=None if used_P is None else used_P.numpy(), amsgrad=amsgrad, **rule)
    flag = torch.zeros(1, dtype=torch.uint8)
    bits = ref.compress(g, m_T, b_T, starts, canon, beta=0.93, seed=0xABCDEF0123, mask_T=mask_T, used_P=used_P,
                        amsgrad=amsgrad, flag=flag, **rule)
    assert np.array_equal(bits.numpy(), expected[0])
    assert np.array_equal(m_T.numpy(), expected[1]) and np.array_equal(b_T.numpy(), expected[2])
    assert bool(flag) == expected[3]


def test_compress_non_finite_leaves_state_and_sets_flag():
    g = torch.tensor([1.0, float("nan"), -2.0, float("inf")])
    m, b = torch.full((4,), 0.5), torch.ones(4)
    starts, canon = ref.index_map([4])
    flag = torch.zeros(1, dtype=torch.uint8)
    bits = ref.unpack_bits(ref.compress(g, m, b, starts, canon, beta=0.5, seed=1, flag=flag), 4)
    assert flag.item() == 1
    assert m[[1, 3]].tolist() == [0.5, 0.5] and b[[1, 3]].tolist() == [1.0, 1.0]
    assert m[[0, 2]].tolist() == [0.75, -0.75] and b[[0, 2]].tolist() == [1.0, 1.5]
    assert bits[[1, 3]].tolist() == [0, 0]
    flag_masked = torch.zeros(1, dtype=torch.uint8)  # a non-finite g that is masked out does not count
    ref.compress(g, m, b, starts, canon, beta=0.5, seed=1, flag=flag_masked,
                 mask_T=torch.tensor([True, False, True, False]))
    assert flag_masked.item() == 0


def test_bits_do_not_depend_on_the_chunking():
    # The same 3 parameters as one chunk or as two chunks in another order: same bits, m, b.
    numels, total = [37, 100, 5], 142
    g_T = torch.randn(total)
    m1, b1 = _random_state(total)
    m2, b2 = m1.clone(), b1.clone()
    starts, canon = ref.index_map(numels, [0, 37, 137])
    whole = ref.unpack_bits(ref.compress(g_T, m1, b1, starts, canon, beta=0.9, seed=5), total)
    s_a, c_a = ref.index_map([5, 37], [137, 0])
    part_a = ref.unpack_bits(ref.compress(torch.cat([g_T[137:], g_T[:37]]), m2, b2, s_a, c_a, beta=0.9, seed=5), 42)
    s_b, c_b = ref.index_map([100], [37])
    part_b = ref.unpack_bits(ref.compress(g_T[37:137], m2, b2, s_b, c_b, beta=0.9, seed=5), 100)
    assert torch.equal(torch.cat([part_a[5:], part_b, part_a[:5]]), whole)
    assert torch.equal(m1, m2) and torch.equal(b1, b2)


def test_requantize_uses_canonical_index_of_first_plus_i():
    starts, canon = ref.index_map([10, 0, 20], [2**32 - 4, 0, 77])
    counts = torch.randint(0, 4, (12,))
    bits = ref.unpack_bits(ref.requantize(counts, 3, starts, canon, 8, seed=4), 12)
    index = np.array([2**32 + 4, 2**32 + 5] + list(range(77, 87)), dtype=np.int64)
    expected = oracle.uniform(index, 4) < counts.numpy().astype(np.float32) / np.float32(3)
    assert np.array_equal(bits.numpy().astype(bool), expected)


@pytest.mark.parametrize("planes", [False, True])
def test_apply_packed_equals_numpy_model(planes):
    numels, canon_starts = [33, 0, 100, 7], [0, 33, 50, 33]
    numel, total = 140, 150
    num_rows = 5
    if planes:
        counts = torch.randint(0, num_rows + 1, (3 * 64,), dtype=torch.int32)
        payload = torch.stack([ref.pack_counts(counts[r * 64:(r + 1) * 64], 3) for r in range(3)])
    else:
        payload = torch.randint(0, 256, (num_rows, ref.num_bytes(numel) + 1), dtype=torch.uint8)
        counts = ref.unpack_bits(payload, numel).sum(0)
    xs = [torch.randn(n) for n in numels]
    lr_P, wd_P = torch.rand(4) * 0.1, torch.rand(4) * 0.1
    mask_T, used_P = torch.rand(total) < 0.6, torch.tensor([1, 1, 1, 0], dtype=torch.uint8)
    starts, canon = ref.index_map(numels, canon_starts)
    expected = oracle.apply_packed([x.numpy() for x in xs], numels, canon_starts, counts.numpy(), num_rows=num_rows,
                                   lr_P=lr_P.numpy(), wd_P=wd_P.numpy(), mask_T=mask_T.numpy(), used_P=used_P.numpy())
    ref.apply_packed_(xs, starts, canon, payload, planes=planes, num_rows=num_rows, lr_P=lr_P, wd_P=wd_P,
                      mask_T=mask_T, used_P=used_P)
    for x, want in zip(xs, expected):
        assert np.array_equal(x.numpy(), want)


def test_apply_update_two_roundings():
    x, update = torch.randn(4097), torch.randn(4097)
    lr, wd = 0.0123, 0.071
    want = x.numpy() - np.float32(lr) * (update.numpy() + np.float32(wd) * x.numpy())
    ref.apply_update_(x, update, lr=lr, weight_decay=wd)
    assert np.array_equal(x.numpy(), want)
