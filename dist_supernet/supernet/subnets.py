"""Plain modules that an exported subnet is made of, and the builder that makes them.

Nothing here knows about supernets: every layer is an ordinary ``nn.Conv2d``,
``nn.Linear``, ``nn.BatchNorm2d`` or ``nn.LayerNorm`` with fixed sizes, so an
exported subnet runs (and is traced, quantized, ONNX-exported) like any other
model. Attribute names mirror the elastic supernets in ``ofa_cnn.py`` and
``elastic_vit.py`` so that a supernet's ``export_state()`` loads with
``strict=True``.

A *subnet config* is a JSON-able dict that fully describes one of these
modules (``family`` plus resolved channel counts); ``families.build_subnet``
rebuilds the module from it alone, which is what ``load_subnet`` relies on.

Shapes: N batch, C channels, H/W height/width, T tokens, D embedding dim,
h heads, d head dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

class ConvBNAct(nn.Module):
    """Conv (no bias: BN follows) + BatchNorm + optional ReLU; padding keeps H/W at stride 1.

    Example::
        >>> layer = ConvBNAct(1, 8, kernel_size=3, stride=2)
        >>> layer(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        depthwise: bool = False,
        act: bool = True,
    ):
        super().__init__()
        groups = in_channels if depthwise else 1
        if depthwise and in_channels != out_channels:
            raise ValueError(f"depthwise conv needs in_channels == out_channels, got {in_channels} != {out_channels}")
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x_NCHW)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, kxk depthwise, 1x1 project, optional identity shortcut.

    Example::
        >>> block = InvertedResidual(8, 24, 8, kernel_size=5, stride=1, residual=True)
        >>> block(torch.zeros(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, kernel_size: int, stride: int, residual: bool
    ):
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                f"residual=True needs stride 1 and in == out, got stride={stride}, {in_channels} -> {out_channels}"
            )
        self.residual = residual
        self.expand = ConvBNAct(in_channels, mid_channels, 1)
        self.depthwise = ConvBNAct(mid_channels, mid_channels, kernel_size, stride, depthwise=True)
        self.project = ConvBNAct(mid_channels, out_channels, 1, act=False)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x_NCHW)))
        return x_NCHW + out if self.residual else out


class ConvNet(nn.Module):
    """A fixed subnet of the OFA-style CNN: stem, stages of inverted residuals, 1x1 head, linear classifier."""

    def __init__(self, config: dict):
        super().__init__()
        stem = config["stem"]
        self.stem = ConvBNAct(config["in_channels"], stem["out_channels"], stem["kernel_size"], stem["stride"])
        self.stages = nn.ModuleList(
            nn.ModuleList(
                InvertedResidual(
                    b["in_channels"], b["mid_channels"], b["out_channels"], b["kernel_size"], b["stride"], b["residual"]
                )
                for b in stage
            )
            for stage in config["stages"]
        )
        last_channels = config["stages"][-1][-1]["out_channels"]
        self.head = ConvBNAct(last_channels, config["head_channels"], 1)
        self.classifier = nn.Linear(config["head_channels"], config["num_classes"])

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        x = self.stem(x_NCHW)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        x = self.head(x).mean(dim=(2, 3))
        return self.classifier(x)


def multi_head_attention(q_NTE: torch.Tensor, k_NTE: torch.Tensor, v_NTE: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Softmax attention over E = num_heads * d features, written out (not SDPA) so FLOP counters see both matmuls.

    The elastic and the plain attention both call this, so they compute in the same order.
    """
    N, T, E = q_NTE.shape
    d = E // num_heads
    q_NhTd, k_NhTd, v_NhTd = (t.reshape(N, T, num_heads, d).transpose(1, 2) for t in (q_NTE, k_NTE, v_NTE))
    scores_NhTT = (q_NhTd @ k_NhTd.transpose(-2, -1)) * (1.0 / math.sqrt(d))
    out_NhTd = scores_NhTT.softmax(dim=-1) @ v_NhTd
    return out_NhTd.transpose(1, 2).reshape(N, T, E)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, with a class token and learned position embeddings."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, num_patches: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        x_NTD = self.proj(x_NCHW).flatten(2).transpose(1, 2)
        cls_N1D = self.cls_token.expand(x_NTD.shape[0], -1, -1)
        return torch.cat([cls_N1D, x_NTD], dim=1) + self.pos_embed


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections of num_heads * head_dim features (k without bias)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        inner = num_heads * head_dim
        self.q = nn.Linear(embed_dim, inner)
        self.k = nn.Linear(embed_dim, inner, bias=False)  # softmax cancels a key bias
        self.v = nn.Linear(embed_dim, inner)
        self.proj = nn.Linear(inner, embed_dim)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        return self.proj(multi_head_attention(self.q(x_NTD), self.k(x_NTD), self.v(x_NTD), self.num_heads))


class MLP(nn.Module):
    def __init__(self, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_NTD)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, mlp_hidden_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attn = Attention(embed_dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = MLP(embed_dim, mlp_hidden_dim)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        x_NTD = x_NTD + self.attn(self.norm1(x_NTD))
        return x_NTD + self.mlp(self.norm2(x_NTD))


class VisionTransformer(nn.Module):
    """A fixed subnet of the elastic ViT: patch embedding, blocks, final norm, linear head on the class token."""

    def __init__(self, config: dict):
        super().__init__()
        num_patches = (config["image_size"] // config["patch_size"]) ** 2
        dim = config["embed_dim"]
        self.patch_embed = PatchEmbed(config["in_channels"], dim, config["patch_size"], num_patches)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, b["num_heads"], config["head_dim"], b["mlp_hidden_dim"]) for b in config["blocks"]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, config["num_classes"])

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        x_NTD = self.patch_embed(x_NCHW)
        for block in self.blocks:
            x_NTD = block(x_NTD)
        return self.head(self.norm(x_NTD)[:, 0])
