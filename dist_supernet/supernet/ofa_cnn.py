"""OFA-style CNN supernet for small images (8x8 digits, 28x28 MNIST).

Layout: 3x3 stem -> stages of inverted-residual blocks -> 1x1 head conv ->
global average pool -> linear classifier. Elastic dimensions:

- ``kernel``: depthwise kernel of every block, from ``kernel_sizes`` (centre crop);
- ``expand``: expand ratio of every block, from ``expand_ratios``;
- ``depth``: blocks per stage, from ``depths``; the trailing blocks are skipped;
- ``width``: a width multiplier from ``width_mults`` for the stem, each stage
  and the head (``len(stage_widths) + 2`` multipliers).

Arch dict (per-block lists cut to the stage's depth)::

    {"width_mult": [stem, stage_1, ..., stage_S, head],
     "depth": [d_1, ..., d_S],
     "kernel_size": [[k_11, ..., k_1d_1], ...],
     "expand_ratio": [[e_11, ..., e_1d_1], ...]}

Only the first block of a stage changes width or stride, so it never has a
shortcut and all later blocks always have one.

Masks (``active_masks``) are for images of the built ``image_size``: kernel
taps that only ever meet padding there (the outer ring of a 5x5 depthwise
kernel on a 2x2 map) get no gradient, so they count as unused.

Counting (``flops``, ``params``): FLOPs are multiply-accumulates of convs and
linear layers (the usual NAS "FLOPs"); BN, ReLU, pooling and additions are not
counted. ``params`` counts the exported subnet's parameters exactly (BN
running stats are buffers, not parameters).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from dist_supernet.errors import ConfigError
from dist_supernet.supernet.elastic import (
    ElasticConvBNAct,
    ElasticInvertedResidual,
    ElasticLinear,
    check_choices,
    check_kernel_sizes,
    make_divisible,
)
from dist_supernet.supernet.space import Gene, Supernet


def _conv_out_size(size: int, kernel_size: int, stride: int) -> int:
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


class OFACNN(Supernet):
    """OFA-style CNN supernet; ``set_active(arch)`` then ``forward(x)`` runs that subnet.

    Example::
        >>> net = OFACNN(in_channels=1, image_size=8, num_classes=10)
        >>> arch = net.min_arch()
        >>> net.set_active(arch)
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> net.flops(arch) < net.flops(net.max_arch())
        True
    """

    family = "ofa_cnn"
    elastic_dims = ("kernel", "depth", "expand", "width")

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        *,
        stem_width: int = 16,
        stage_widths: Sequence[int] = (16, 24, 32),
        stage_strides: Sequence[int] | None = None,
        head_width: int = 64,
        kernel_sizes: Sequence[int] = (3, 5),
        expand_ratios: Sequence[float] = (2, 3, 4),
        depths: Sequence[int] = (1, 2, 3),
        width_mults: Sequence[float] = (0.75, 1.0),
        kernel_transform: bool = False,
        channel_divisor: int = 4,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("image_size", image_size), ("num_classes", num_classes),
                           ("stem_width", stem_width), ("head_width", head_width),
                           ("channel_divisor", channel_divisor)):
            if int(value) != value or value < 1:
                raise ConfigError(key, value, "expected a positive integer")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        if not stage_widths or any(int(w) != w or w < 1 for w in stage_widths):
            raise ConfigError("stage_widths", list(stage_widths), "expected a non-empty list of positive integers")
        self.stage_widths = [int(w) for w in stage_widths]
        if stage_strides is None:
            # Large enough inputs get three halvings (28 -> 14 -> 7 -> 4); 8x8 keeps full resolution in stage 1.
            num = len(self.stage_widths)
            stage_strides = [2] * num if image_size >= 16 else [1] + [2] * (num - 1)
        if len(stage_strides) != len(self.stage_widths) or any(s not in (1, 2) for s in stage_strides):
            raise ConfigError("stage_strides", list(stage_strides),
                              f"expected {len(self.stage_widths)} values, each 1 or 2")
        self.stage_strides = list(stage_strides)
        self.kernel_sizes = check_kernel_sizes("kernel_sizes", kernel_sizes)
        self.expand_ratios = check_choices("expand_ratios", expand_ratios)
        self.depths = check_choices("depths", depths)
        if any(int(d) != d for d in self.depths):
            raise ConfigError("depths", list(depths), "expected positive integers")
        self.depths = [int(d) for d in self.depths]
        self.width_mults = check_choices("width_mults", width_mults)
        self.stem_width, self.head_width = stem_width, head_width
        self.kernel_transform = kernel_transform
        self.channel_divisor = channel_divisor
        self.max_depth = self.depths[-1]
        self.num_stages = len(self.stage_widths)

        max_mult = self.width_mults[-1]
        max_stem = self._channels(stem_width, max_mult)
        max_stage = [self._channels(w, max_mult) for w in self.stage_widths]
        self.stem = ElasticConvBNAct(in_channels, max_stem, (3,))
        self.stages = nn.ModuleList()
        max_in = max_stem
        for width, stride in zip(max_stage, self.stage_strides):
            blocks = nn.ModuleList()
            for j in range(self.max_depth):
                blocks.append(
                    ElasticInvertedResidual(
                        max_in if j == 0 else width,
                        width,
                        self.kernel_sizes,
                        self.expand_ratios,
                        stride=stride if j == 0 else 1,
                        residual=j > 0,
                        kernel_transform=kernel_transform,
                        channel_divisor=channel_divisor,
                    )
                )
            self.stages.append(blocks)
            max_in = width
        if zero_init_residual:
            # BigNAS: the last BN of every residual block starts at gamma = 0, so at init each such block is
            # the identity and every depth computes what the shallowest subnet computes.
            for blocks in self.stages:
                for block in blocks:
                    if block.residual:
                        nn.init.zeros_(block.project.bn.weight)
        self.zero_init_residual = bool(zero_init_residual)
        self.head = ElasticConvBNAct(max_in, self._channels(head_width, max_mult), (1,))
        self._set_input_sizes()
        self.classifier = ElasticLinear(self._channels(head_width, max_mult), num_classes)
        self._genes = self._build_genes()
        self.set_active(self.max_arch())

    def _set_input_sizes(self) -> None:
        """Tell each kxk conv its input size (fixed by image_size and strides) so masks skip padding-only taps."""
        size = self.image_size
        self.stem.conv.input_size = size
        for blocks, stride in zip(self.stages, self.stage_strides):
            for j, block in enumerate(blocks):
                block.depthwise.conv.input_size = size
                if j == 0:
                    size = _conv_out_size(size, 1, stride)  # same output size for every odd kernel

    def _channels(self, base: int, mult: float) -> int:
        return make_divisible(base * mult, self.channel_divisor)

    # ---- search space ---------------------------------------------------------------------------
    def _build_genes(self) -> list[Gene]:
        width = tuple(self.width_mults)
        genes = [Gene(f"width_mult[{i}]", "width", width) for i in range(self.num_stages + 2)]
        for i in range(self.num_stages):
            genes.append(Gene(f"depth[{i}]", "depth", tuple(self.depths)))
            for j in range(self.max_depth):
                genes.append(Gene(f"kernel_size[{i}][{j}]", "kernel", tuple(self.kernel_sizes)))
                genes.append(Gene(f"expand_ratio[{i}][{j}]", "expand", tuple(self.expand_ratios)))
        return genes

    def genes(self) -> list[Gene]:
        return self._genes

    def genes_to_arch(self, values: Sequence) -> dict:
        values = list(values)
        S, M = self.num_stages, self.max_depth
        arch = {"width_mult": values[: S + 2], "depth": [], "kernel_size": [], "expand_ratio": []}
        pos = S + 2
        for _ in range(S):
            depth = values[pos]
            block_values = values[pos + 1 : pos + 1 + 2 * M]
            arch["depth"].append(depth)
            arch["kernel_size"].append(block_values[0 : 2 * depth : 2])
            arch["expand_ratio"].append(block_values[1 : 2 * depth : 2])
            pos += 1 + 2 * M
        return arch

    def arch_to_genes(self, arch: dict) -> list:
        S, M = self.num_stages, self.max_depth
        for key in ("width_mult", "depth", "kernel_size", "expand_ratio"):
            if key not in arch:
                raise ValueError(
                    f"arch is missing key {key!r} (ofa_cnn needs width_mult, depth, kernel_size, expand_ratio)"
                )
        for key, length in (("width_mult", S + 2), ("depth", S), ("kernel_size", S), ("expand_ratio", S)):
            if not isinstance(arch[key], (list, tuple)) or len(arch[key]) != length:
                raise ValueError(f"arch {key}={arch[key]!r}: expected a list of {length}")
        values = list(arch["width_mult"])
        for i in range(S):
            depth = arch["depth"][i]
            if depth not in self.depths:
                raise ValueError(f"arch depth[{i}]={depth!r}: expected one of {self.depths}")
            kernels, expands = arch["kernel_size"][i], arch["expand_ratio"][i]
            for key, per_block in (("kernel_size", kernels), ("expand_ratio", expands)):
                if not isinstance(per_block, (list, tuple)) or len(per_block) != depth:
                    raise ValueError(f"arch {key}[{i}]={per_block!r}: expected a list of depth[{i}]={depth} values")
            values.append(depth)
            for j in range(M):
                values += [kernels[j], expands[j]] if j < depth else [None, None]
        return values

    def num_subnets(self, elastic: Iterable[str] | None = None) -> int:
        dims = self.resolve_elastic(elastic)
        widths = len(self.width_mults) if "width" in dims else 1
        per_block = (len(self.kernel_sizes) if "kernel" in dims else 1) * (
            len(self.expand_ratios) if "expand" in dims else 1
        )
        depths = self.depths if "depth" in dims else [self.max_depth]
        per_stage = sum(per_block**d for d in depths)
        return widths ** (self.num_stages + 2) * per_stage**self.num_stages

    def subnet_config(self, arch: dict) -> dict:
        """Resolved channel counts of ``arch``: everything ``families.build_subnet`` needs, JSON-able."""
        arch = self.validate_arch(arch)
        mults = arch["width_mult"]
        stem_out = self._channels(self.stem_width, mults[0])
        stages, in_channels = [], stem_out
        for i in range(self.num_stages):
            out = self._channels(self.stage_widths[i], mults[i + 1])
            blocks = []
            for j in range(arch["depth"][i]):
                block_in = in_channels if j == 0 else out
                blocks.append({
                    "in_channels": block_in,
                    "mid_channels": make_divisible(block_in * arch["expand_ratio"][i][j], self.channel_divisor),
                    "out_channels": out,
                    "kernel_size": arch["kernel_size"][i][j],
                    "stride": self.stage_strides[i] if j == 0 else 1,
                    "residual": j > 0,
                })
            stages.append(blocks)
            in_channels = out
        return {
            "family": self.family,
            "arch": arch,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "stem": {"out_channels": stem_out, "kernel_size": 3, "stride": 1},
            "stages": stages,
            "head_channels": self._channels(self.head_width, mults[-1]),
        }

    def flops(self, arch: dict, image_size: int | None = None) -> int:
        """Multiply-accumulates of one image (convs and classifier) at ``image_size`` (default: the built size)."""
        cfg = self.subnet_config(arch)
        size = self.image_size if image_size is None else image_size
        stem = cfg["stem"]
        size = _conv_out_size(size, stem["kernel_size"], stem["stride"])
        total = size * size * stem["out_channels"] * self.in_channels * stem["kernel_size"] ** 2
        channels = stem["out_channels"]
        for stage in cfg["stages"]:
            for b in stage:
                total += size * size * b["mid_channels"] * b["in_channels"]
                size = _conv_out_size(size, b["kernel_size"], b["stride"])
                total += size * size * b["mid_channels"] * b["kernel_size"] ** 2
                total += size * size * b["out_channels"] * b["mid_channels"]
                channels = b["out_channels"]
        total += size * size * cfg["head_channels"] * channels
        total += cfg["head_channels"] * self.num_classes
        return total

    def params(self, arch: dict) -> int:
        """Parameters of the exported subnet (conv weights, BN affine, classifier weight and bias)."""
        cfg = self.subnet_config(arch)
        stem = cfg["stem"]
        total = stem["out_channels"] * (self.in_channels * stem["kernel_size"] ** 2 + 2)
        channels = stem["out_channels"]
        for stage in cfg["stages"]:
            for b in stage:
                mid = b["mid_channels"]
                total += mid * (b["in_channels"] + 2) + mid * (b["kernel_size"] ** 2 + 2)
                total += b["out_channels"] * (mid + 2)
                channels = b["out_channels"]
        total += cfg["head_channels"] * (channels + 2)
        total += (cfg["head_channels"] + 1) * self.num_classes
        return total

    # ---- weight sharing -------------------------------------------------------------------------
    def _apply_arch(self, arch: dict) -> None:
        mults = arch["width_mult"]
        self.stem.set_active(out_channels=self._channels(self.stem_width, mults[0]))
        for i, blocks in enumerate(self.stages):
            out = self._channels(self.stage_widths[i], mults[i + 1])
            for j in range(arch["depth"][i]):
                blocks[j].set_active(
                    out_channels=out, kernel_size=arch["kernel_size"][i][j], expand_ratio=arch["expand_ratio"][i][j]
                )
        self.head.set_active(out_channels=self._channels(self.head_width, mults[-1]))
        self.active_depths = list(arch["depth"])

    def _active_layers(self) -> Iterator[tuple[str, nn.Module]]:
        yield "stem", self.stem
        for i, blocks in enumerate(self.stages):
            for j in range(self.active_depths[i]):
                yield f"stages.{i}.{j}", blocks[j]
        yield "head", self.head
        yield "classifier", self.classifier

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        x = self.stem(x_NCHW)
        for i, blocks in enumerate(self.stages):
            for j in range(self.active_depths[i]):
                x = blocks[j](x)
        x = self.head(x).mean(dim=(2, 3))
        return self.classifier(x)
