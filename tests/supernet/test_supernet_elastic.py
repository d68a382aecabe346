"""Elastic layers against plain torch layers built from the same sliced weights (odd sizes, explicit tolerances)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_supernet.supernet.elastic import (
    ElasticAttention,
    ElasticBatchNorm2d,
    ElasticConv2d,
    ElasticDepthwiseConv2d,
    ElasticInvertedResidual,
    ElasticLayerNorm,
    ElasticLinear,
    ElasticMLP,
    ElasticTransformerBlock,
    make_divisible,
)
from dist_supernet.supernet.subnets import MLP, Attention, InvertedResidual, TransformerBlock

ATOL = 1e-5  # fp32, same ops on copied vs sliced weights


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _load(plain: nn.Module, state: dict) -> nn.Module:
    plain.load_state_dict(state, strict=True)
    return plain


@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (5, 2), (7, 1)])
def test_conv_is_centre_crop_of_leading_filters(kernel_size, stride):
    conv = ElasticConv2d(9, 11, kernel_sizes=[3, 5, 7], stride=stride, bias=True)
    conv.set_active(out_channels=7, kernel_size=kernel_size)
    x = torch.randn(2, 5, 9, 9)
    start = (7 - kernel_size) // 2
    weight = conv.weight[:7, :5, start : start + kernel_size, start : start + kernel_size]
    expected = F.conv2d(x, weight, conv.bias[:7], stride, kernel_size // 2)
    torch.testing.assert_close(conv(x), expected, atol=ATOL, rtol=0)
    plain = _load(nn.Conv2d(5, 7, kernel_size, stride, kernel_size // 2), conv.export_state(5))
    torch.testing.assert_close(plain(x), conv(x), atol=ATOL, rtol=0)


def test_kernel_transform_starts_as_crop_and_exports_the_transformed_kernel():
    conv = ElasticDepthwiseConv2d(6, kernel_sizes=[3, 5, 7], kernel_transform=True)
    crop = ElasticDepthwiseConv2d(6, kernel_sizes=[3, 5, 7])
    crop.weight.data.copy_(conv.weight.data)
    x = torch.randn(2, 5, 8, 8)
    for k in (3, 5, 7):
        conv.set_active(kernel_size=k)
        crop.set_active(kernel_size=k)
        torch.testing.assert_close(conv(x), crop(x), atol=ATOL, rtol=0)  # identity matrices at init
    assert {n for n, _ in conv.named_parameters()} == {"weight", "kernel_transform_7to5", "kernel_transform_5to3"}
    with torch.no_grad():
        for name in ("kernel_transform_7to5", "kernel_transform_5to3"):
            getattr(conv, name).add_(0.1 * torch.randn_like(getattr(conv, name)))
    conv.set_active(kernel_size=3)
    plain = _load(nn.Conv2d(5, 5, 3, 1, 1, groups=5, bias=False), conv.export_state(5))
    torch.testing.assert_close(plain(x), conv(x), atol=ATOL, rtol=0)
    assert not torch.allclose(conv(x), crop(x), atol=1e-3)
    assert set(conv.used_slices(5)) == {"weight", "kernel_transform_7to5", "kernel_transform_5to3"}


def test_depthwise_follows_input_width():
    conv = ElasticDepthwiseConv2d(10, kernel_sizes=[3, 5], stride=2)
    conv.set_active(kernel_size=3)
    x = torch.randn(3, 7, 9, 9)
    expected = F.conv2d(x, conv.weight[:7, :, 1:4, 1:4], None, 2, 1, groups=7)
    torch.testing.assert_close(conv(x), expected, atol=ATOL, rtol=0)


def test_padding_only_taps_are_unused():
    conv = ElasticDepthwiseConv2d(4, kernel_sizes=[3, 5])
    conv.input_size = 2  # a 5x5 kernel over a 2x2 map: rows 0 and 4 only ever meet padding
    rows = conv.used_slices(4)["weight"][2]
    assert (rows.start, rows.stop) == (1, 4)
    conv.set_active(kernel_size=3)
    rows = conv.used_slices(4)["weight"][2]
    assert (rows.start, rows.stop) == (1, 4)


def test_linear_layernorm_and_bn_slices():
    fc = ElasticLinear(13, 9)
    fc.set_active(out_features=4)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(fc(x), F.linear(x, fc.weight[:4, :6], fc.bias[:4]), atol=ATOL, rtol=0)

    ln = ElasticLayerNorm(13)
    nn.init.normal_(ln.weight)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (6,), ln.weight[:6], ln.bias[:6]), atol=ATOL, rtol=0)

    bn = ElasticBatchNorm2d(11, momentum=0.5)
    before = bn.running_mean.clone()
    x4 = torch.randn(4, 7, 3, 3) + 2.0
    bn.train()
    bn(x4)
    torch.testing.assert_close(bn.running_mean[:7], 0.5 * x4.mean(dim=(0, 2, 3)), atol=ATOL, rtol=0)
    assert torch.equal(bn.running_mean[7:], before[7:])  # inactive channels untouched
    bn.eval()
    plain = _load(nn.BatchNorm2d(7), bn.export_state(7)).eval()
    torch.testing.assert_close(plain(x4), bn(x4), atol=ATOL, rtol=0)


def test_inverted_residual_matches_plain_block():
    block = ElasticInvertedResidual(12, 12, kernel_sizes=[3, 5], expand_ratios=[2, 3], residual=True)
    block.set_active(out_channels=8, kernel_size=5, expand_ratio=3)
    for m in block.modules():
        if isinstance(m, ElasticBatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    block.eval()
    x = torch.randn(2, 8, 5, 5)
    mid = make_divisible(8 * 3, 4)
    plain = _load(InvertedResidual(8, mid, 8, 5, 1, True), block.export_state(8)).eval()
    torch.testing.assert_close(plain(x), block(x), atol=ATOL, rtol=0)


def test_transformer_pieces_match_plain_modules():
    x = torch.randn(2, 5, 24)
    attn = ElasticAttention(32, max_num_heads=4, head_dim=8)
    attn.set_active(num_heads=3)
    plain = _load(Attention(24, 3, 8), attn.export_state(24))
    torch.testing.assert_close(plain(x), attn(x), atol=ATOL, rtol=0)

    mlp = ElasticMLP(32, max_mlp_ratio=4)
    mlp.set_active(mlp_ratio=2.5)
    plain = _load(MLP(24, 60), mlp.export_state(24))
    torch.testing.assert_close(plain(x), mlp(x), atol=ATOL, rtol=0)

    block = ElasticTransformerBlock(32, max_num_heads=4, head_dim=8, max_mlp_ratio=4)
    block.set_active(num_heads=2, mlp_ratio=3)
    plain = _load(TransformerBlock(24, 2, 8, 72), block.export_state(24))
    torch.testing.assert_close(plain(x), block(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ElasticConv2d(4, 4, kernel_sizes=[]), "kernel_sizes"),
        (lambda: ElasticConv2d(4, 4, kernel_sizes=[3, 4]), "kernel_sizes"),
        (lambda: ElasticInvertedResidual(4, 4, [3], expand_ratios=[]), "expand_ratios"),
        (lambda: ElasticInvertedResidual(4, 4, [3], [2], stride=2, residual=True), "residual"),
        (lambda: ElasticConv2d(4, 4, [3]).set_active(out_channels=5), "out_channels"),
        (lambda: ElasticConv2d(4, 4, [3]).set_active(kernel_size=5), "kernel_size"),
        (lambda: ElasticAttention(8, 2, 4).set_active(num_heads=3), "num_heads"),
    ],
)
def test_bad_configuration_names_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        make()
