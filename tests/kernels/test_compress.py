"""Triton compress vs the torch reference: same bits, same m and b, masks, odd sizes, unbiasedness.

Tolerances: in the CPU interpreter the kernel reproduces the reference's
rounding exactly (fma where torch uses one), so bits and state match exactly
there. On a GPU the compiler may contract other products into fmas, so m and
b are compared to RTOL_STATE and random bits may differ where a draw lands
within rounding of its threshold: at most MISMATCH_FRACTION of them.
Deterministic elements (|r| = 1, masked) must always match exactly.
"""

import importlib

import pytest
import torch

import kernels
from kernels import reference as ref

ODD_SIZES = [1, 31, 33, 4097]
RTOL_STATE = 1e-6  # ~8 fp32 ulps: fma contraction moves one product by half an ulp
MISMATCH_FRACTION = 1e-4  # random bits within fp32 rounding of their threshold


def _inputs(numel, device, *, g_dtype=torch.float32):
    g = torch.randn(numel, device=device).to(g_dtype)
    b = torch.rand(numel, device=device) + 0.05
    m = (torch.rand(numel, device=device) * 2 - 1) * b
    b[::5] = 0.0  # never-updated elements: r = 0
    m[::5] = 0.0
    index = torch.randperm(numel, device=device).to(torch.int32) + 1000
    return g, m, b, index


def _run_both(tk, g, m, b, index, **kwargs):
    m_t, b_t, m_r, b_r = m.clone(), b.clone(), m.clone(), b.clone()
    bits_t = tk.compress(g, m_t, b_t, index, **kwargs)
    bits_r = ref.compress(g, m_r, b_r, index, **kwargs)
    return (bits_t, m_t, b_t), (bits_r, m_r, b_r)


def _num_mismatches(bits_a, bits_b, numel):
    return int((ref.unpack_bits(bits_a, numel) != ref.unpack_bits(bits_b, numel)).sum())


@pytest.mark.parametrize("numel", ODD_SIZES)
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
def test_deterministic_bits_exact(tk, device, numel, g_dtype):
    # m = sign * b and g of the same sign keep |m| == b exactly: r = +-1, no randomness.
    sign = torch.where(torch.rand(numel, device=device) < 0.5, -1.0, 1.0)
    b = torch.rand(numel, device=device) + 0.1
    m = sign * b
    g = (sign * (torch.rand(numel, device=device) + 0.01)).to(g_dtype)
    index = torch.arange(numel, dtype=torch.int32, device=device)
    (bits_t, m_t, b_t), (bits_r, _, _) = _run_both(tk, g, m, b, index, beta=0.9, seed=3)
    assert bits_t.shape == (ref.num_bytes(numel),) and bits_t.dtype == torch.uint8
    assert torch.equal(bits_t, bits_r)
    assert torch.equal(bits_t, ref.pack_bits(sign > 0))
    assert torch.equal(m_t.abs(), b_t)


@pytest.mark.parametrize("numel", ODD_SIZES + [20000])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_random_inputs_match_reference(tk, device, numel, amsgrad):
    g, m, b, index = _inputs(numel, device)
    seed = 0x1234_5678_9ABC_DEF0
    (bits_t, m_t, b_t), (bits_r, m_r, b_r) = _run_both(tk, g, m, b, index, beta=0.9, seed=seed, amsgrad=amsgrad)
    torch.testing.assert_close(m_t, m_r, rtol=RTOL_STATE, atol=1e-12)
    torch.testing.assert_close(b_t, b_r, rtol=RTOL_STATE, atol=1e-12)
    assert _num_mismatches(bits_t, bits_r, numel) <= MISMATCH_FRACTION * numel
    if device == "cpu":  # the interpreter reproduces the reference's rounding exactly
        assert torch.equal(m_t, m_r) and torch.equal(b_t, b_r) and torch.equal(bits_t, bits_r)


@pytest.mark.parametrize("numel", [33, 4097])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_mask_keeps_state_and_emits_zero(tk, device, numel, amsgrad):
    g, m, b, index = _inputs(numel, device)
    mask = torch.rand(numel, device=device) < 0.6
    (bits_t, m_t, b_t), (bits_r, m_r, b_r) = _run_both(
        tk, g, m, b, index, beta=0.95, seed=11, mask=mask, amsgrad=amsgrad
    )
    assert torch.equal(m_t[~mask], m[~mask]) and torch.equal(b_t[~mask], b[~mask])
    assert int(ref.unpack_bits(bits_t, numel)[~mask].sum()) == 0
    torch.testing.assert_close(m_t, m_r, rtol=RTOL_STATE, atol=1e-12)
    torch.testing.assert_close(b_t, b_r, rtol=RTOL_STATE, atol=1e-12)
    assert _num_mismatches(bits_t, bits_r, numel) <= MISMATCH_FRACTION * numel


@pytest.mark.parametrize("g_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients(tk, device, g_dtype):
    numel = 4097
    g, m, b, index = _inputs(numel, device, g_dtype=g_dtype)
    (bits_t, m_t, b_t), (bits_r, m_r, b_r) = _run_both(tk, g, m, b, index, beta=0.9, seed=99)
    torch.testing.assert_close(m_t, m_r, rtol=RTOL_STATE, atol=1e-12)
    torch.testing.assert_close(b_t, b_r, rtol=RTOL_STATE, atol=1e-12)
    assert _num_mismatches(bits_t, bits_r, numel) <= MISMATCH_FRACTION * numel


def test_zero_b_and_empty(tk, device):
    numel = 1000
    zeros = torch.zeros(numel, device=device)
    m, b = zeros.clone(), zeros.clone()
    index = torch.arange(numel, dtype=torch.int32, device=device)
    bits = tk.compress(zeros, m, b, index, beta=0.9, seed=8)
    assert not torch.isnan(m).any() and not torch.isnan(b).any()
    assert torch.equal(bits, ref.compress(zeros, zeros.clone(), zeros.clone(), index, beta=0.9, seed=8))
    empty = torch.empty(0, device=device)
    out = tk.compress(empty, empty.clone(), empty.clone(), torch.empty(0, dtype=torch.int32, device=device), beta=0.9, seed=0)
    assert out.shape == (0,) and out.dtype == torch.uint8


def test_unbiased(tk, device):
    # E[2 * bit - 1] = r. 8 groups of 2048 elements with one r each, 8 seeds: 16384 draws per
    # group; the mean of n draws of +-1 has sigma = sqrt((1 - r^2) / n); bound 5 sigma (+1e-6).
    ratios = torch.tensor([-1.0, -0.9, -0.5, -0.1, 0.0, 0.3, 0.77, 1.0], device=device)
    per_group, num_seeds = 2048, 8
    numel = ratios.numel() * per_group
    b0 = torch.rand(numel, device=device) + 0.5
    m0 = ratios.repeat_interleave(per_group) * b0
    g = torch.zeros(numel, device=device)
    index = torch.arange(numel, dtype=torch.int32, device=device)
    total = torch.zeros(numel, device=device)
    for seed in range(num_seeds):
        m, b = m0.clone(), b0.clone()
        bits = tk.compress(g, m, b, index, beta=0.9, seed=seed * 0x9E3779B97F4A7C15)
        total += ref.unpack_bits(bits, numel).float() * 2 - 1
    r = (m / b).view(-1, per_group).mean(dim=1)  # the ratio the kernel actually used
    mean = (total / num_seeds).view(-1, per_group).mean(dim=1)
    sigma = ((1 - r**2).clamp_min(0) / (per_group * num_seeds)).sqrt()
    assert ((mean - r).abs() <= 5 * sigma + 1e-6).all(), (mean - r, sigma)


def test_dispatch_routes_to_triton(triton_backend, device):
    numel = 100
    g, m, b, index = _inputs(numel, device)
    m_r, b_r = m.clone(), b.clone()
    bits = kernels.compress(g, m, b, index, beta=0.9, seed=4)
    importlib.import_module("kernels.ops.compress")  # the launcher module lives apart from the dispatcher

    assert callable(kernels.compress) and kernels.compress.__module__ == "kernels"
    expected = ref.compress(g, m_r, b_r, index, beta=0.9, seed=4)
    assert _num_mismatches(bits, expected, numel) <= MISMATCH_FRACTION * numel


def test_rejects_bad_state(tk, device):
    g = torch.randn(8, device=device)
    index = torch.arange(8, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="m"):
        tk.compress(g, torch.zeros(8, 2, device=device).t()[0], torch.zeros(8, device=device), index, beta=0.9, seed=0)
    with pytest.raises(ValueError, match="b dtype"):
        tk.compress(g, torch.zeros(8, device=device), torch.zeros(8, device=device, dtype=torch.float64), index, beta=0.9, seed=0)
