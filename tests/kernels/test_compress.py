"""compress on every backend: exact bits, m, b against the reference; masks, segments, non-finite, 2**32.

Tolerance: none. The contract fixes the rounding (two roundings, no fma), so every backend
must give the reference's bits, m and b exactly; the Triton kernels run in the CPU
interpreter here unless a GPU is present, where the same equalities are asserted.
"""

import pytest
import torch

from dist_supernet.kernels import reference as ref

from .conftest import chunk

ODD_SIZES = [0, 1, 31, 33, 4097]
# The update rules of the contract: the paper's (b = EMA of |g|, beta2 = beta) and the second-moment one
# (b = EMA of g * g with its own beta2, r = scale * m / sqrt(b); |r| > 1 happens and acts as +-1).
RULES = {"paper": {}, "rms": dict(rms=True, beta2=0.99, ratio_scale=1.7), "clipped": dict(g_scale=0.37),
         "rms_clipped": dict(rms=True, beta2=0.999, ratio_scale=0.8, g_scale=0.2)}


def _state(total, device, *, zero_every=5):
    b = torch.rand(total, device=device) + 0.05
    m = (torch.rand(total, device=device) * 2 - 1) * b
    b[::zero_every] = 0.0  # never-updated elements: r = 0
    m[::zero_every] = 0.0
    return m, b


def _both(impl, g, m, b, starts, canon, **kwargs):
    """(bits, m, b, flag) of impl and of the reference on copies of the same inputs."""
    results = []
    for fn in (impl, ref.compress):
        m_c, b_c = m.clone(), b.clone()
        flag = torch.zeros(1, dtype=torch.uint8, device=m.device)
        bits = fn(g, m_c, b_c, starts, canon, flag=flag, **kwargs)
        results.append((bits, m_c, b_c, int(flag)))
    return results


def _assert_same(got, want):
    assert got[0].dtype == torch.uint8 and got[0].shape == want[0].shape
    assert torch.equal(got[0], want[0]), "bits"
    assert torch.equal(got[1], want[1]), "m"
    assert torch.equal(got[2], want[2]), "b"
    assert got[3] == want[3], "flag"


@pytest.mark.parametrize("numel", ODD_SIZES)
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
def test_deterministic_bits(backend, numel, g_dtype):
    # m = sign * b and g of the same sign keep |m| == b exactly: r = +-1, no randomness.
    device = backend.device
    sign = torch.where(torch.rand(numel, device=device) < 0.5, -1.0, 1.0)
    b = torch.rand(numel, device=device) + 0.1
    m = sign * b
    g = (sign * (torch.rand(numel, device=device) + 0.01)).to(g_dtype)
    starts, canon = chunk([numel], device=device)
    bits = backend.compress(g, m, b, starts, canon, beta=0.9, seed=3)
    assert bits.shape == (ref.num_bytes(numel),) and bits.dtype == torch.uint8
    assert torch.equal(bits, ref.pack_bits(sign > 0))
    assert torch.equal(m.abs(), b)


@pytest.mark.parametrize("numel", ODD_SIZES + [20000])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("rule", RULES)
def test_random_inputs_exact(compiled, numel, amsgrad, rule):
    device = compiled.device
    g = torch.randn(numel, device=device)
    m, b = _state(numel, device)
    starts, canon = chunk([numel], [1000], device=device)
    state = (torch.cat([torch.zeros(1000, device=device), m]), torch.cat([torch.zeros(1000, device=device), b]))
    got, want = _both(compiled.compress, g, *state, starts, canon, beta=0.9, seed=0x1234_5678_9ABC_DEF0,
                      amsgrad=amsgrad, **RULES[rule])
    _assert_same(got, want)


def _segmented_case(device, *, wide=False):
    """5 segments (two empty), out of canonical order, with masks: (g, m_T, b_T, starts, canon, extras)."""
    numels = [700, 0, 33, 0, 3001]
    base = 2**32 - 1500 if wide else 0  # wide: the last segment crosses 2**32, canon > 2**32 for the rest
    canon_starts = [base + 3100, base + 3, base, base + 3800, base + 40]
    total = 3800
    g = torch.randn(sum(numels), device=device)
    g[[5, 750, 2000]] = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
    m_T, b_T = _state(total, device)
    starts, canon = chunk(numels, canon_starts, device=device)
    extras = dict(mask_T=torch.rand(total, device=device) < 0.7,
                  used_P=torch.tensor([1, 0, 1, 1, 0], dtype=torch.uint8, device=device), state_offset=base)
    return g, m_T, b_T, starts, canon, extras


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("which", ["none", "mask", "used", "both"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("rule", ["paper", "rms_clipped"])  # every rule's arithmetic: test_random_inputs_exact
def test_segments_masks_exact(compiled, wide, which, amsgrad, rule):
    g, m_T, b_T, starts, canon, extras = _segmented_case(compiled.device, wide=wide)
    kwargs = dict(state_offset=extras["state_offset"])
    if which in ("mask", "both"):
        kwargs["mask_T"] = extras["mask_T"]
    if which in ("used", "both"):
        kwargs["used_P"] = extras["used_P"]
    got, want = _both(compiled.compress, g, m_T, b_T, starts, canon, beta=0.95, seed=11, amsgrad=amsgrad, **kwargs,
                      **RULES[rule])
    _assert_same(got, want)


def test_inactive_and_non_finite_keep_state(backend):
    g, m_T, b_T, starts, canon, extras = _segmented_case(backend.device)
    m0, b0 = m_T.clone(), b_T.clone()
    flag = torch.zeros(1, dtype=torch.uint8, device=backend.device)
    bits = backend.compress(g, m_T, b_T, starts, canon, beta=0.9, seed=2, mask_T=extras["mask_T"],
                            used_P=extras["used_P"], flag=flag)
    index, seg = ref.canonical_index(starts, canon, 0, g.numel())
    active = extras["mask_T"][index] & (extras["used_P"][seg] != 0)
    update = active & torch.isfinite(g)
    assert int(flag) == int(bool((active & ~torch.isfinite(g)).any()))
    touched = torch.zeros_like(m0, dtype=torch.bool)
    touched[index[update]] = True
    assert torch.equal(m_T[~touched], m0[~touched]) and torch.equal(b_T[~touched], b0[~touched])
    assert bool((m_T[touched] != m0[touched]).all())  # beta < 1 and g != 0: every finite active one moved
    assert int(ref.unpack_bits(bits, g.numel())[~update].sum()) == 0


def test_flag_never_cleared(backend):
    device = backend.device
    starts, canon = chunk([8], device=device)
    flag = torch.ones(1, dtype=torch.uint8, device=device)
    backend.compress(torch.ones(8, device=device), torch.zeros(8, device=device), torch.zeros(8, device=device),
                     starts, canon, beta=0.9, seed=0, flag=flag)
    assert int(flag) == 1


@pytest.mark.parametrize("g_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_exact(compiled, g_dtype):
    device = compiled.device
    g = torch.randn(4097, device=device).to(g_dtype)
    m, b = _state(4097, device)
    starts, canon = chunk([4097], device=device)
    got, want = _both(compiled.compress, g, m, b, starts, canon, beta=0.9, seed=99)
    _assert_same(got, want)


def test_zero_b_gives_fair_bits(backend):
    numel = 1 << 14
    device = backend.device
    zeros = torch.zeros(numel, device=device)
    m, b = zeros.clone(), zeros.clone()
    starts, canon = chunk([numel], device=device)
    bits = backend.compress(zeros, m, b, starts, canon, beta=0.9, seed=8)
    assert torch.equal(m, zeros) and torch.equal(b, zeros)
    ones = float(ref.unpack_bits(bits, numel).float().mean())
    assert abs(ones - 0.5) < 5 * 0.5 / 128  # 16384 fair draws: sigma = 0.5 / 128, bound 5 sigma


def test_unbiased(backend):
    # E[2 bit - 1] = r. 8 groups of 1024 elements with one r each, 4 seeds: 4096 draws per group;
    # the mean of n draws of +-1 has sigma = sqrt((1 - r^2) / n); bound 5 sigma (+1e-6).
    device = backend.device
    ratios = torch.tensor([-1.0, -0.9, -0.5, -0.1, 0.0, 0.3, 0.77, 1.0], device=device)
    per_group, num_seeds = 1024, 4
    numel = ratios.numel() * per_group
    b0 = torch.rand(numel, device=device) + 0.5
    m0 = ratios.repeat_interleave(per_group) * b0
    g = torch.zeros(numel, device=device)
    starts, canon = chunk([numel], [2**32 - numel // 2], device=device)  # half the draws past 2**32
    total = torch.zeros(numel, device=device)
    for seed in range(num_seeds):
        m, b = m0.clone(), b0.clone()
        bits = backend.compress(g, m, b, starts, canon, beta=0.9, seed=seed * 0x9E3779B97F4A7C15,
                                state_offset=2**32 - numel // 2)
        total += ref.unpack_bits(bits, numel).float() * 2 - 1
    r = (m / b).view(-1, per_group).mean(dim=1)
    mean = (total / num_seeds).view(-1, per_group).mean(dim=1)
    sigma = ((1 - r**2).clamp_min(0) / (per_group * num_seeds)).sqrt()
    assert ((mean - r).abs() <= 5 * sigma + 1e-6).all(), (mean - r, sigma)


def test_rms_rule_draws_the_clamped_ratio(backend):
    # rms: r = scale * m / sqrt(b) after the update; |r| >= 1 gives the sign's bit every time, otherwise
    # E[2 bit - 1] = r (4 seeds x 1024 draws per group, bound 5 sigma as above).
    device = backend.device
    targets = torch.tensor([-3.0, -1.0, -0.4, 0.0, 0.5, 2.5], device=device)
    per_group, num_seeds, scale = 1024, 4, 1.5
    numel = targets.numel() * per_group
    b0 = torch.rand(numel, device=device) + 0.5
    m0 = targets.repeat_interleave(per_group) * b0.sqrt() / scale
    starts, canon = chunk([numel], device=device)
    total = torch.zeros(numel, device=device)
    for seed in range(num_seeds):
        m, b = m0.clone(), b0.clone()
        bits = backend.compress(torch.zeros(numel, device=device), m, b, starts, canon, beta=0.9, seed=seed + 1,
                                beta2=0.99, rms=True, ratio_scale=scale)
        total += ref.unpack_bits(bits, numel).float() * 2 - 1
    r = ((m * scale) / b.sqrt()).clamp(-1, 1).view(-1, per_group)
    mean = (total / num_seeds).view(-1, per_group)
    saturated = r.abs() == 1
    assert torch.equal(mean[saturated], r[saturated])  # deterministic past +-1
    sigma = ((1 - r.mean(dim=1) ** 2) / (per_group * num_seeds)).sqrt()
    assert ((mean.mean(dim=1) - r.mean(dim=1)).abs() <= 5 * sigma + 1e-6).all()


def test_rejects_bad_state(compiled):
    device = compiled.device
    g = torch.randn(8, device=device)
    starts, canon = chunk([8], device=device)
    with pytest.raises(ValueError, match="m_T"):
        compiled.compress(g, torch.zeros(8, 2, device=device).t()[0], torch.zeros(8, device=device), starts, canon,
                          beta=0.9, seed=0)
    with pytest.raises(ValueError, match="b_T"):
        compiled.compress(g, torch.zeros(8, device=device), torch.zeros(8, device=device, dtype=torch.float64),
                          starts, canon, beta=0.9, seed=0)
    with pytest.raises(ValueError, match="int64"):
        compiled.compress(g, torch.zeros(8, device=device), torch.zeros(8, device=device), starts.int(), canon,
                          beta=0.9, seed=0)


def test_numba_rejects_an_index_map_outside_the_state():
    # numba runs without bounds checks: a map that reaches past m_T must raise, not write past it.
    from dist_supernet.kernels.registry import implementation

    pytest.importorskip("numba")
    compress = implementation("compress", "numba")
    g, m, b = torch.randn(10), torch.zeros(10), torch.zeros(10)
    for numels, canon_starts, offset in (([10], [1], 0), ([4, 6], [0, 2], 3), ([10], [0], 0)):
        starts, canon = chunk(numels, canon_starts)
        if offset == 0 and canon_starts == [0]:
            starts = torch.tensor([0, 11])  # seg_starts[P] != D
        with pytest.raises(ValueError):
            compress(g, m, b, starts, canon, beta=0.9, seed=0, state_offset=offset)
    assert torch.equal(m, torch.zeros(10))
