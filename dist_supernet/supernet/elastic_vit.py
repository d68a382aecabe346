"""Small elastic ViT supernet over image patches (AutoFormer / ElasticViT style).

Patch embedding (+ class token, position embedding) -> pre-norm transformer
blocks -> LayerNorm -> linear head on the class token. Elastic dimensions:

- ``embed``: embedding dim of the whole residual stream, from ``embed_dims``
  (leading features of every weight that touches it);
- ``depth``: number of blocks, from ``depths``; trailing blocks are skipped;
- ``heads``: heads per block, from ``num_heads``, each ``head_dim`` wide
  (q/k/v width = heads * head_dim, independent of the embedding dim; no key
  bias, since softmax cancels it);
- ``mlp``: MLP ratio per block, from ``mlp_ratios`` (hidden = round(ratio * embed)).

Arch dict (per-block lists cut to the depth)::

    {"embed_dim": 48, "depth": 3, "num_heads": [2, 4, 1], "mlp_ratio": [2, 4, 3]}

Counting: FLOPs are multiply-accumulates of the patch conv, every linear layer
and the two attention matmuls (q k^T and attn v); norms, softmax, GELU and
additions are not counted. ``params`` is exact for the exported subnet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from dist_supernet.errors import ConfigError
from dist_supernet.supernet.elastic import (
    ElasticLayerNorm,
    ElasticLinear,
    ElasticPatchEmbed,
    ElasticTransformerBlock,
    check_choices,
    mlp_hidden_dim,
)
from dist_supernet.supernet.space import Gene, Supernet


def default_patch_size(image_size: int) -> int:
    """2 px patches for tiny images (8x8 -> 16 tokens), 4 px above 16 px (28x28 -> 49 tokens)."""
    return 2 if image_size <= 16 else 4


class ElasticViT(Supernet):
    """Elastic ViT supernet; ``set_active(arch)`` then ``forward(x)`` runs that subnet.

    Example::
        >>> net = ElasticViT(in_channels=1, image_size=8, num_classes=10)
        >>> net.set_active({"embed_dim": 32, "depth": 2, "num_heads": [1, 2], "mlp_ratio": [2, 4]})
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    family = "elastic_vit"
    elastic_dims = ("embed", "depth", "heads", "mlp")

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        *,
        patch_size: int | None = None,
        embed_dims: Sequence[int] = (32, 48, 64),
        num_heads: Sequence[int] = (1, 2, 4),
        head_dim: int = 16,
        mlp_ratios: Sequence[float] = (2, 3, 4),
        depths: Sequence[int] = (2, 3, 4),
    ):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("image_size", image_size),
                           ("num_classes", num_classes), ("head_dim", head_dim)):
            if int(value) != value or value < 1:
                raise ConfigError(key, value, "expected a positive integer")
        patch_size = default_patch_size(image_size) if patch_size is None else patch_size
        if patch_size < 1 or image_size % patch_size:
            raise ConfigError("patch_size", patch_size, f"must divide image_size={image_size}")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.patch_size, self.head_dim = patch_size, head_dim
        self.num_patches = (image_size // patch_size) ** 2
        self.embed_dims = check_choices("embed_dims", embed_dims)
        self.num_heads = check_choices("num_heads", num_heads)
        self.mlp_ratios = check_choices("mlp_ratios", mlp_ratios)
        self.depths = check_choices("depths", depths)
        for key, values in (("embed_dims", self.embed_dims), ("num_heads", self.num_heads), ("depths", self.depths)):
            if any(int(v) != v for v in values):
                raise ConfigError(key, values, "expected positive integers")
        self.max_depth = int(self.depths[-1])
        max_dim = int(self.embed_dims[-1])

        self.patch_embed = ElasticPatchEmbed(in_channels, max_dim, patch_size, self.num_patches)
        self.blocks = nn.ModuleList(
            ElasticTransformerBlock(max_dim, int(self.num_heads[-1]), head_dim, self.mlp_ratios[-1])
            for _ in range(self.max_depth)
        )
        self.norm = ElasticLayerNorm(max_dim)
        self.head = ElasticLinear(max_dim, num_classes)
        self._init_weights()
        self._genes = self._build_genes()
        self.set_active(self.max_arch())

    def _init_weights(self) -> None:
        # ViT init: truncated normal(0.02) for linear weights and embeddings, zero biases.
        for module in self.modules():
            if isinstance(module, ElasticLinear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.patch_embed.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.patch_embed.cls_token, std=0.02)

    # ---- search space ---------------------------------------------------------------------------
    def _build_genes(self) -> list[Gene]:
        genes = [Gene("embed_dim", "embed", tuple(self.embed_dims)), Gene("depth", "depth", tuple(self.depths))]
        for j in range(self.max_depth):
            genes.append(Gene(f"num_heads[{j}]", "heads", tuple(self.num_heads)))
            genes.append(Gene(f"mlp_ratio[{j}]", "mlp", tuple(self.mlp_ratios)))
        return genes

    def genes(self) -> list[Gene]:
        return self._genes

    def genes_to_arch(self, values: Sequence) -> dict:
        embed_dim, depth, *per_block = values
        return {
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": list(per_block[0 : 2 * depth : 2]),
            "mlp_ratio": list(per_block[1 : 2 * depth : 2]),
        }

    def arch_to_genes(self, arch: dict) -> list:
        for key in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
            if key not in arch:
                raise ValueError(
                    f"arch is missing key {key!r} (elastic_vit needs embed_dim, depth, num_heads, mlp_ratio)"
                )
        depth = arch["depth"]
        if depth not in self.depths:
            raise ValueError(f"arch depth={depth!r}: expected one of {self.depths}")
        for key in ("num_heads", "mlp_ratio"):
            if not isinstance(arch[key], (list, tuple)) or len(arch[key]) != depth:
                raise ValueError(f"arch {key}={arch[key]!r}: expected a list of depth={depth} values")
        values = [arch["embed_dim"], depth]
        for j in range(self.max_depth):
            values += [arch["num_heads"][j], arch["mlp_ratio"][j]] if j < depth else [None, None]
        return values

    def num_subnets(self, elastic: Iterable[str] | None = None) -> int:
        dims = self.resolve_elastic(elastic)
        embeds = len(self.embed_dims) if "embed" in dims else 1
        per_block = (len(self.num_heads) if "heads" in dims else 1) * (len(self.mlp_ratios) if "mlp" in dims else 1)
        depths = self.depths if "depth" in dims else [self.max_depth]
        return embeds * sum(per_block**d for d in depths)

    def subnet_config(self, arch: dict) -> dict:
        """Resolved sizes of ``arch``: everything ``families.build_subnet`` needs, JSON-able."""
        arch = self.validate_arch(arch)
        dim = arch["embed_dim"]
        return {
            "family": self.family,
            "arch": arch,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "patch_size": self.patch_size,
            "head_dim": self.head_dim,
            "embed_dim": dim,
            "blocks": [
                {"num_heads": h, "mlp_hidden_dim": mlp_hidden_dim(dim, r)}
                for h, r in zip(arch["num_heads"], arch["mlp_ratio"])
            ],
        }

    def flops(self, arch: dict, image_size: int | None = None) -> int:
        """Multiply-accumulates for one image at ``image_size`` (default: built size)."""
        cfg = self.subnet_config(arch)
        size = self.image_size if image_size is None else image_size
        patches = (size // self.patch_size) ** 2
        tokens = patches + 1
        D = cfg["embed_dim"]
        total = patches * D * self.in_channels * self.patch_size**2
        for b in cfg["blocks"]:
            inner = b["num_heads"] * self.head_dim
            total += 3 * tokens * D * inner  # q, k, v
            total += 2 * tokens * tokens * inner  # q k^T and attn v
            total += tokens * inner * D  # proj
            total += 2 * tokens * D * b["mlp_hidden_dim"]  # fc1, fc2
        total += D * self.num_classes
        return total

    def params(self, arch: dict) -> int:
        """Parameters of the exported subnet, embeddings and norms included."""
        cfg = self.subnet_config(arch)
        D = cfg["embed_dim"]
        total = D * (self.in_channels * self.patch_size**2 + 1) + D + (self.num_patches + 1) * D
        for b in cfg["blocks"]:
            inner, hidden = b["num_heads"] * self.head_dim, b["mlp_hidden_dim"]
            total += 2 * 2 * D  # two LayerNorms
            total += 2 * inner * (D + 1) + inner * D + D * (inner + 1)  # q, v with bias; k without; proj
            total += hidden * (D + 1) + D * (hidden + 1)
        total += 2 * D + self.num_classes * (D + 1)
        return total

    # ---- weight sharing -------------------------------------------------------------------------
    def _apply_arch(self, arch: dict) -> None:
        self.patch_embed.set_active(embed_dim=arch["embed_dim"])
        for j in range(arch["depth"]):
            self.blocks[j].set_active(num_heads=arch["num_heads"][j], mlp_ratio=arch["mlp_ratio"][j])
        self.active_depth = arch["depth"]

    def _active_layers(self) -> Iterator[tuple[str, nn.Module]]:
        yield "patch_embed", self.patch_embed
        for j in range(self.active_depth):
            yield f"blocks.{j}", self.blocks[j]
        yield "norm", self.norm
        yield "head", self.head

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        x_NTD = self.patch_embed(x_NCHW)
        for j in range(self.active_depth):
            x_NTD = self.blocks[j](x_NTD)
        return self.head(self.norm(x_NTD)[:, 0])
