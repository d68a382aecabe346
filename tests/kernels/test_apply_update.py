"""Triton apply_update_ / apply_packed_ vs the torch reference: values, masks, half precision.

fp32 x: the kernel does the reference's arithmetic (x * wd + update, then one
fma for x - lr * step), so results match to RTOL_FP32 (exactly in the
interpreter). bf16/fp16 x: the kernel rounds once at the end while the
reference rounds each intermediate to x's dtype: compare within 1 unit of
x's precision (RTOL_HALF).
"""

import pytest
import torch

import kernels
from kernels import reference as ref

ODD_SIZES = [1, 31, 33, 4097]
RTOL_FP32 = 1e-6
RTOL_HALF = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.mark.parametrize("numel", ODD_SIZES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_apply_update_matches(tk, device, numel, weight_decay):
    x = torch.randn(numel, device=device)
    update = torch.randint(-4, 5, (numel,), device=device).float() / 4
    x_t, x_r = x.clone(), x.clone()
    assert tk.apply_update_(x_t, update, lr=0.01, weight_decay=weight_decay) is x_t
    ref.apply_update_(x_r, update, lr=0.01, weight_decay=weight_decay)
    torch.testing.assert_close(x_t, x_r, rtol=RTOL_FP32, atol=1e-7)
    if device == "cpu":
        assert torch.equal(x_t, x_r)


@pytest.mark.parametrize("numel", [33, 4097])
def test_apply_update_mask_untouched(tk, device, numel):
    x = torch.randn(numel, device=device)
    update = torch.randn(numel, device=device)
    mask = torch.rand(numel, device=device) < 0.5
    x_t, x_r = x.clone(), x.clone()
    tk.apply_update_(x_t, update, lr=0.1, weight_decay=0.1, mask=mask)
    ref.apply_update_(x_r, update, lr=0.1, weight_decay=0.1, mask=mask)
    assert torch.equal(x_t[~mask], x[~mask])
    torch.testing.assert_close(x_t, x_r, rtol=RTOL_FP32, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_update_half_params(tk, device, dtype):
    numel = 4097
    x = torch.randn(numel, device=device).to(dtype)
    update = torch.randint(-4, 5, (numel,), device=device).float() / 4
    x_t, x_r = x.clone(), x.clone()
    tk.apply_update_(x_t, update, lr=0.01, weight_decay=0.05)
    ref.apply_update_(x_r, update, lr=0.01, weight_decay=0.05)
    assert x_t.dtype == dtype
    # The reference's rounding of step = update + wd * x to x's dtype moves x by up to
    # lr * |step| * eps: allowed absolutely (x can be near 0), plus one unit of x relatively.
    max_step = float((update.abs() + 0.05 * x.float().abs()).max())
    atol = 2 * 0.01 * max_step * RTOL_HALF[dtype]
    torch.testing.assert_close(x_t.float(), x_r.float(), rtol=RTOL_HALF[dtype], atol=atol)


@pytest.mark.parametrize("numel", ODD_SIZES)
@pytest.mark.parametrize("num_rows", [1, 3, 8])
def test_apply_packed_matches(tk, device, numel, num_rows):
    rows = torch.randint(0, 256, (num_rows, ref.num_bytes(numel)), dtype=torch.uint8, device=device)
    x = torch.randn(numel, device=device)
    mask = torch.rand(numel, device=device) < 0.7
    x_t, x_r = x.clone(), x.clone()
    tk.apply_packed_(x_t, rows, lr=0.01, weight_decay=0.1, mask=mask)
    ref.apply_packed_(x_r, rows, lr=0.01, weight_decay=0.1, mask=mask)
    assert torch.equal(x_t[~mask], x[~mask])
    torch.testing.assert_close(x_t, x_r, rtol=RTOL_FP32, atol=1e-7)
    if device == "cpu":
        assert torch.equal(x_t, x_r)


def test_apply_packed_shaped_param_and_bf16(tk, device):
    x = torch.randn(17, 9, device=device).to(torch.bfloat16)
    rows = torch.randint(0, 256, (4, ref.num_bytes(x.numel())), dtype=torch.uint8, device=device)
    x_t, x_r = x.clone(), x.clone()
    tk.apply_packed_(x_t, rows, lr=0.05, weight_decay=0.0)
    ref.apply_packed_(x_r, rows, lr=0.05, weight_decay=0.0)
    torch.testing.assert_close(x_t.float(), x_r.float(), rtol=RTOL_HALF[torch.bfloat16], atol=1e-6)


def test_empty_and_non_contiguous(tk, device):
    empty = torch.empty(0, device=device)
    assert tk.apply_update_(empty, empty, lr=0.1, weight_decay=0.0).shape == (0,)
    assert tk.apply_packed_(empty, torch.zeros((2, 0), dtype=torch.uint8, device=device), lr=0.1, weight_decay=0.0).shape == (0,)
    with pytest.raises(ValueError, match="contiguous"):
        tk.apply_update_(torch.zeros(4, 3, device=device).t(), torch.zeros(12, device=device), lr=0.1, weight_decay=0.0)


def test_dispatch(triton_backend, device):
    x = torch.randn(50, device=device)
    rows = torch.randint(0, 256, (2, ref.num_bytes(50)), dtype=torch.uint8, device=device)
    x_t, x_r = x.clone(), x.clone()
    kernels.apply_packed_(x_t, rows, lr=0.1, weight_decay=0.01)
    ref.apply_packed_(x_r, rows, lr=0.1, weight_decay=0.01)
    torch.testing.assert_close(x_t, x_r, rtol=RTOL_FP32, atol=1e-7)
    update = kernels.unpack_mean(rows, 50)
    kernels.apply_update_(x, update, lr=0.1, weight_decay=0.01)
    torch.testing.assert_close(x, x_r, rtol=RTOL_FP32, atol=1e-7)
