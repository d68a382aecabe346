"""Statistical quality of the counter-based draw (the reference; every backend equals it bit for bit).

Birder needs the draws of one step independent across elements, ranks and steps. The draws of
consecutive (or structurally related) indices under one seed, and of one index under related
seeds, are checked with chi-square tests of independence on 5-bit windows of the draw (top,
middle and low bits: 32 x 32 cells), and the bits' avalanche. Every bound is 5 sigma (the
Wilson-Hilferty normal approximation of the chi-square), so a correct hash fails with
probability below 1e-6 per check; the inputs are fixed, so the outcome is too.

What these tests caught, each made by hand and then reverted: a 2-multiply hash (one keyed
lowbias32 round) fails the neighbour and structured-difference tests (z = 10 to 80 at lags
8, 48, 96, 512, 4096, 8192 and at single-bit index differences); the previous hash (two
lowbias32 rounds with the seed halves xored in) fails the related-seeds test (seeds that differ
only in their low 32 bits drew a permutation of each other's numbers).
"""

import math

import pytest
import torch

from dist_supernet.kernels import reference as ref

SEED = 0x243F6A8885A308D3
WINDOWS = (20, 10, 0)  # right shifts of the 25-bit draw: top, middle and low 5 bits
BOUND = 5.0


def chi2_z(counts: torch.Tensor) -> float:
    """Normal deviate of a chi-square goodness-of-fit to equal cell counts (Wilson-Hilferty)."""
    counts = counts.double().reshape(-1)
    expected = float(counts.sum()) / counts.numel()
    df = counts.numel() - 1
    chi2 = float(((counts - expected) ** 2).sum()) / expected
    return ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def pair_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst chi-square deviate of the joint 5-bit windows of two draw tensors (independent: about N(0, 1))."""
    worst = -math.inf
    for shift in WINDOWS:
        cells = ((a >> shift) & 31) * 32 + ((b >> shift) & 31)
        worst = max(worst, chi2_z(torch.bincount(cells.long(), minlength=1024)))
    return worst


@pytest.mark.parametrize("base", [0, 2**32 - 2**19, 2**40 + 12345])  # low, crossing a high half, high
def test_draws_are_uniform(base):
    draws = ref.draw(torch.arange(base, base + 2**20), SEED)
    assert chi2_z(torch.bincount((draws >> 15).long(), minlength=1024)) < BOUND  # top 10 bits
    assert chi2_z(torch.bincount((draws & 1023).long(), minlength=1024)) < BOUND  # low 10 bits


def test_neighbouring_indices_are_independent():
    # Elements of one parameter: consecutive canonical indices. Lags where a 2-multiply hash fails.
    draws = ref.draw(torch.arange(2**20), SEED)
    for lag in (1, 2, 3, 8, 48, 96, 512, 4096, 8192, 65536):
        assert pair_z(draws[:-lag], draws[lag:]) < BOUND, lag


def test_structured_index_differences_are_independent():
    # Random indices against the index plus a power of two (a single input bit, or a carry chain),
    # minus 8 or 512, and two two-bit differences: the differentials a multiply-xorshift hash is weakest
    # on. Low halves only (the per-element function; the high half enters through the keys).
    index = torch.randint(0, 2**32, (2**20,), generator=torch.Generator().manual_seed(1))
    draws = ref.draw(index, SEED)
    deltas = [1 << k for k in range(32)] + [-8, -512, 0x40001000, 0x8008000]
    worst = max((pair_z(draws, ref.draw((index + delta) & 0xFFFFFFFF, SEED)), delta) for delta in deltas)
    assert worst[0] < BOUND, worst


def test_rank_and_step_seeds_are_independent():
    from dist_supernet.comm import mix_seed

    index = torch.arange(2**20)
    seeds = [mix_seed(7, rank, step, 0) for rank in range(3) for step in range(2)]
    draws = [ref.draw(index, seed) for seed in seeds]
    for i in range(len(seeds)):
        for j in range(i + 1, len(seeds)):
            assert pair_z(draws[i], draws[j]) < BOUND, (i, j)


@pytest.mark.parametrize("delta", [1, 1 << 15, 1 << 31, 1 << 32, 1 << 63])
def test_related_seeds_draw_unrelated_numbers(delta):
    # Seeds that differ in one bit. The previous hash xored the seed's low half into the index, so
    # seeds differing only there drew a permutation of the same numbers over an aligned block.
    index = torch.arange(2**16)
    a, b = ref.draw(index, SEED), ref.draw(index, SEED ^ delta)
    assert not torch.equal(a.sort().values, b.sort().values)
    assert pair_z(a, b) < BOUND


def test_avalanche_of_index_and_seed_bits():
    # Flipping one input bit (index bits 0-39, seed bits 0-63) flips each of the 25 draw bits with
    # probability 1/2: n = 2**14 samples, sigma = 0.5 / 128, bound 5 sigma.
    n = 2**14
    index = torch.randint(0, 2**32, (n,), generator=torch.Generator().manual_seed(2))
    base = ref.draw(index, SEED)
    bit = torch.arange(ref.DRAW_BITS)
    bound = BOUND * 0.5 / math.sqrt(n)
    flips = [ref.draw(index ^ (1 << k), SEED) for k in range(40)]
    flips += [ref.draw(index, SEED ^ (1 << k)) for k in range(64)]
    for k, other in enumerate(flips):
        rate = (((base ^ other).unsqueeze(1) >> bit) & 1).double().mean(dim=0)
        assert float((rate - 0.5).abs().max()) < bound, (k, rate)
