"""Elastic layers: one shared max-size weight, sliced to the sub-layer that is active.

Every elastic module

- holds its parameters at the largest size, under the names torch uses
  (``weight``, ``bias``, ...), so an elastic layer at max size loads a plain
  layer's state dict;
- takes its *output* size from ``set_active(...)`` (set by the supernet from
  the architecture) and its *input* size from the incoming tensor, so no layer
  needs to be told what the previous one produced;
- answers, for a given input size, the three questions that masks, export and
  the tests ask (:class:`ElasticModule`): which slice of each parameter the
  forward reads, what the equivalent plain layer's weights are, and how wide
  its output is. A layer made of elastic layers (:class:`ElasticComposite`)
  only lists them with what each reads; :func:`per_layer` is the one loop that
  collects their answers, for the blocks here and for the whole supernet
  (``Supernet._used_slices`` / ``_export_state`` in ``space.py``).

Slicing rules (the ones OFA / BigNAS / AutoFormer use): widths keep the
*leading* channels, a smaller kernel is the *centre crop* of the max kernel.
Kernel choice: centre crop by default (BigNAS / AttentiveNAS); with
``kernel_transform=True`` each step down (e.g. 5 -> 3) also multiplies the
cropped k*k kernel by a learned k^2 x k^2 matrix shared over channels,
initialised to the identity (OFA's "kernel transformation matrices").

Shapes: N batch, C channels, H/W height/width, T tokens, D embedding dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_supernet.errors import ConfigError
from dist_supernet.supernet.subnets import multi_head_attention

# An index into a parameter: one slice per dimension, e.g. (slice(0, 16), slice(0, 8), slice(1, 4), slice(1, 4)).
Index = tuple[slice, ...]


def make_divisible(value: float, divisor: int) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), never more than 10% below it.

    Hardware likes channel counts that are multiples of a small number; the 10%
    rule (MobileNet's) keeps rounding from shrinking a layer noticeably.
    Monotone in ``value``, so the largest choice always gives the largest width.

    Example::
        >>> make_divisible(16 * 0.75, 4), make_divisible(5.0, 4)
        (12, 8)
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def check_choices(key: str, choices: Sequence, *, positive: bool = True) -> list:
    """Sorted unique copy of a choice list; ``ConfigError`` naming ``key`` if it is empty or not positive."""
    values = sorted(set(choices))
    if not values:
        raise ConfigError(key, list(choices), "need at least one choice")
    if positive and any(v <= 0 for v in values):
        raise ConfigError(key, list(choices), "choices must be positive")
    return values


def check_kernel_sizes(key: str, kernel_sizes: Sequence[int]) -> list[int]:
    """Sorted unique odd kernel sizes; even sizes have no centre, so a centre crop is undefined."""
    sizes = check_choices(key, kernel_sizes)
    even = [k for k in sizes if int(k) != k or k % 2 == 0]
    if even:
        raise ConfigError(key, list(kernel_sizes), f"kernel sizes must be odd (centre crop), got {even}")
    return [int(k) for k in sizes]


def mlp_hidden_dim(embed_dim: int, mlp_ratio: float) -> int:
    """Hidden width of a transformer MLP: ``round(mlp_ratio * embed_dim)``, at least 1."""
    return max(1, int(round(embed_dim * mlp_ratio)))


def prefixed(prefix: str, entries: dict) -> dict:
    return {f"{prefix}.{name}": value for name, value in entries.items()}


# A layer of a composite elastic module: (attribute name, the module, the channels or features it reads).
Layer = tuple[str, "ElasticModule", int]


def chained(layers: Iterable[tuple[str, "ElasticModule"]], in_features: int) -> Iterator[Layer]:
    """Layers run one after another: each reads what the previous one outputs (``out_features``).

    Lazy, so each layer's ``out_features`` is asked after its ``used_slices`` / ``export_state`` ran.
    """
    for name, module in layers:
        yield name, module, in_features
        in_features = module.out_features(in_features)


def per_layer(layers: Iterable[Layer], method: str) -> dict:
    """``used_slices`` or ``export_state`` of every layer, its names prefixed with the layer's: the one loop
    behind every composite elastic module's and every supernet's masks and export."""
    result = {}
    for name, module, in_features in layers:
        result.update(prefixed(name, getattr(module, method)(in_features)))
    return result


class ElasticModule:
    """What every elastic module answers for an input of ``in_features`` channels (the active config is set).

    - ``used_slices(in_features)``: ``{param_name: Index}``, the slice of each
      own parameter (names relative to this module, as in ``named_parameters``)
      that the forward reads. Parameters it leaves out are not read at all.
    - ``export_state(in_features)``: the state dict of the equivalent plain
      module (``subnets.py``), tensors detached and copied.
    - ``out_features(in_features)``: channels (or features) of the output.
    """

    def used_slices(self, in_features: int) -> dict[str, Index]:
        raise NotImplementedError

    def export_state(self, in_features: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def out_features(self, in_features: int) -> int:
        raise NotImplementedError


class ElasticComposite(ElasticModule):
    """An elastic module made of elastic layers: its slices and export are theirs (:func:`per_layer`).

    Subclasses say which layers read what in ``layers(in_features)``, after
    making any width that follows the input (``_follow_input``) current.
    """

    def layers(self, in_features: int) -> Iterable[Layer]:
        raise NotImplementedError

    def used_slices(self, in_features: int) -> dict[str, Index]:
        return per_layer(self.layers(in_features), "used_slices")

    def export_state(self, in_features: int) -> dict[str, torch.Tensor]:
        return per_layer(self.layers(in_features), "export_state")


class _ElasticKernelConv(nn.Module, ElasticModule):
    """Shared kernel logic of the dense and depthwise elastic convs: crop (and optionally transform) the max kernel."""

    def __init__(
        self,
        weight_shape: tuple[int, int],
        kernel_sizes: Sequence[int],
        stride: int,
        padding: int | None,
        bias: bool,
        kernel_transform: bool,
    ):
        super().__init__()
        if padding is None:
            self.kernel_sizes = check_kernel_sizes("kernel_sizes", kernel_sizes)
        else:
            # Explicit padding (patch embedding): one fixed kernel, any size.
            self.kernel_sizes = check_choices("kernel_sizes", kernel_sizes)
            if len(self.kernel_sizes) != 1:
                raise ValueError(f"kernel_sizes={list(kernel_sizes)!r}: explicit padding needs a single kernel size")
        self.max_kernel_size = self.kernel_sizes[-1]
        self.stride = stride
        self.padding = padding
        self.kernel_transform = kernel_transform and len(self.kernel_sizes) > 1
        K = self.max_kernel_size
        self.weight = nn.Parameter(torch.empty(*weight_shape, K, K))
        # fan_out Kaiming normal: the MobileNet / OFA init for convs followed by BN.
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        if self.kernel_transform:
            for big, small in self._steps_down(self.kernel_sizes[0]):
                self.register_parameter(self._transform_name(big, small), nn.Parameter(torch.eye(small * small)))
        self.active_kernel_size = K
        # Spatial size of the input this conv sees, when the model knows it: kernel rows and columns that only
        # ever meet padding then count as unused (no gradient can reach them, so the optimizer must not move them).
        self.input_size: int | None = None

    @staticmethod
    def _transform_name(big: int, small: int) -> str:
        return f"kernel_transform_{big}to{small}"

    def _steps_down(self, kernel_size: int) -> list[tuple[int, int]]:
        """(bigger, smaller) kernel pairs walked from the max kernel down to ``kernel_size``."""
        sizes = [k for k in self.kernel_sizes if k >= kernel_size][::-1]
        return list(zip(sizes, sizes[1:]))

    def _set_kernel(self, kernel_size: int | None) -> None:
        if kernel_size is None:
            kernel_size = self.max_kernel_size
        if kernel_size not in self.kernel_sizes:
            raise ValueError(f"kernel_size={kernel_size!r}: expected one of {self.kernel_sizes}")
        self.active_kernel_size = kernel_size

    def _crop_kernel(self, weight: torch.Tensor) -> torch.Tensor:
        """The active kxk kernel from a channel-sliced (..., K, K) weight."""
        k = self.active_kernel_size
        if not self.kernel_transform:
            start = (self.max_kernel_size - k) // 2
            return weight[..., start : start + k, start : start + k]
        kernel = weight
        for big, small in self._steps_down(k):
            start = (big - small) // 2
            kernel = kernel[..., start : start + small, start : start + small]
            matrix = getattr(self, self._transform_name(big, small))
            kernel = (kernel.reshape(-1, small * small) @ matrix).reshape(*kernel.shape)
        return kernel

    def _kernel_slices(self) -> tuple[tuple[slice, slice], dict[str, Index]]:
        """Spatial slice of ``weight`` that the active kernel reads, and the transform matrices it uses."""
        k = self.active_kernel_size
        steps = self._steps_down(k) if self.kernel_transform else []
        transforms = {self._transform_name(big, small): (slice(None), slice(None)) for big, small in steps}
        if steps:
            # The first step mixes every element of the second-largest crop (padding-only rows included:
            # a safe over-approximation).
            start = (self.max_kernel_size - steps[0][1]) // 2
            rows = slice(start, start + steps[0][1])
            return (rows, rows), transforms
        low, high = 0, k
        if self.input_size is not None:
            # Output o reads input o * stride + i - padding for kernel index i; keep the i that land inside.
            H, p = self.input_size, self._padding()
            num_out = (H + 2 * p - k) // self.stride + 1
            low, high = max(0, p - (num_out - 1) * self.stride), min(k, p + H)
        start = (self.max_kernel_size - k) // 2
        rows = slice(start + low, start + high)
        return (rows, rows), transforms

    def _padding(self) -> int:
        return self.active_kernel_size // 2 if self.padding is None else self.padding


class ElasticConv2d(_ElasticKernelConv):
    """Dense conv with elastic output width (leading filters) and kernel size (centre crop); input width from x.

    Example::
        >>> conv = ElasticConv2d(8, 16, kernel_sizes=[3, 5])
        >>> conv.set_active(out_channels=12, kernel_size=3)
        >>> conv(torch.zeros(2, 6, 7, 7)).shape
        torch.Size([2, 12, 7, 7])
    """

    def __init__(
        self,
        max_in_channels: int,
        max_out_channels: int,
        kernel_sizes: Sequence[int] = (1,),
        stride: int = 1,
        padding: int | None = None,
        bias: bool = False,
        kernel_transform: bool = False,
    ):
        super().__init__((max_out_channels, max_in_channels), kernel_sizes, stride, padding, bias, kernel_transform)
        self.max_in_channels = max_in_channels
        self.max_out_channels = max_out_channels
        self.active_out_channels = max_out_channels

    def set_active(self, out_channels: int | None = None, kernel_size: int | None = None) -> None:
        out_channels = self.max_out_channels if out_channels is None else out_channels
        if not 1 <= out_channels <= self.max_out_channels:
            raise ValueError(f"out_channels={out_channels!r}: expected 1..{self.max_out_channels}")
        self.active_out_channels = out_channels
        self._set_kernel(kernel_size)

    def active_weight(self, in_channels: int) -> torch.Tensor:
        return self._crop_kernel(self.weight[: self.active_out_channels, :in_channels])

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias[: self.active_out_channels]
        weight = self.active_weight(x_NCHW.shape[1])
        return F.conv2d(x_NCHW, weight, bias, self.stride, self._padding())

    def used_slices(self, in_features: int) -> dict[str, Index]:
        spatial, transforms = self._kernel_slices()
        out = slice(0, self.active_out_channels)
        used = {"weight": (out, slice(0, in_features), *spatial), **transforms}
        if self.bias is not None:
            used["bias"] = (out,)
        return used

    def export_state(self, in_features: int) -> dict[str, torch.Tensor]:
        state = {"weight": self.active_weight(in_features).detach().clone()}
        if self.bias is not None:
            state["bias"] = self.bias[: self.active_out_channels].detach().clone()
        return state

    def out_features(self, in_features: int) -> int:
        return self.active_out_channels


class ElasticDepthwiseConv2d(_ElasticKernelConv):
    """Depthwise conv (groups = channels): width follows the input, kernel is elastic (centre crop).

    Example::
        >>> conv = ElasticDepthwiseConv2d(32, kernel_sizes=[3, 5], stride=2)
        >>> conv.set_active(kernel_size=3)
        >>> conv(torch.zeros(2, 24, 8, 8)).shape
        torch.Size([2, 24, 4, 4])
    """

    def __init__(
        self,
        max_channels: int,
        kernel_sizes: Sequence[int] = (3,),
        stride: int = 1,
        bias: bool = False,
        kernel_transform: bool = False,
    ):
        super().__init__((max_channels, 1), kernel_sizes, stride, None, bias, kernel_transform)
        self.max_channels = max_channels

    def set_active(self, kernel_size: int | None = None) -> None:
        self._set_kernel(kernel_size)

    def active_weight(self, in_channels: int) -> torch.Tensor:
        return self._crop_kernel(self.weight[:in_channels])

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        C = x_NCHW.shape[1]
        bias = None if self.bias is None else self.bias[:C]
        return F.conv2d(x_NCHW, self.active_weight(C), bias, self.stride, self._padding(), groups=C)

    def used_slices(self, in_features: int) -> dict[str, Index]:
        spatial, transforms = self._kernel_slices()
        used = {"weight": (slice(0, in_features), slice(None), *spatial), **transforms}
        if self.bias is not None:
            used["bias"] = (slice(0, in_features),)
        return used

    def export_state(self, in_features: int) -> dict[str, torch.Tensor]:
        state = {"weight": self.active_weight(in_features).detach().clone()}
        if self.bias is not None:
            state["bias"] = self.bias[:in_features].detach().clone()
        return state

    def out_features(self, in_features: int) -> int:
        return in_features


class ElasticLinear(nn.Module, ElasticModule):
    """Linear layer with elastic in (from x) and out (leading rows) features.

    Example::
        >>> fc = ElasticLinear(64, 10)
        >>> fc(torch.zeros(2, 5, 48)).shape
        torch.Size([2, 5, 10])
    """

    def __init__(self, max_in_features: int, max_out_features: int, bias: bool = True):
        super().__init__()
        self.max_in_features = max_in_features
        self.max_out_features = max_out_features
        self.weight = nn.Parameter(torch.empty(max_out_features, max_in_features))
        self.bias = nn.Parameter(torch.empty(max_out_features)) if bias else None
        # nn.Linear's default init, with fan-in of the max layer.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(max_in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.active_out_features = max_out_features

    def set_active(self, out_features: int | None = None) -> None:
        out_features = self.max_out_features if out_features is None else out_features
        if not 1 <= out_features <= self.max_out_features:
            raise ValueError(f"out_features={out_features!r}: expected 1..{self.max_out_features}")
        self.active_out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.active_out_features
        bias = None if self.bias is None else self.bias[:out]
        return F.linear(x, self.weight[:out, : x.shape[-1]], bias)

    def used_slices(self, in_features: int) -> dict[str, Index]:
        out = slice(0, self.active_out_features)
        used = {"weight": (out, slice(0, in_features))}
        if self.bias is not None:
            used["bias"] = (out,)
        return used

    def export_state(self, in_features: int) -> dict[str, torch.Tensor]:
        used = self.used_slices(in_features)
        return {name: self.get_parameter(name)[idx].detach().clone() for name, idx in used.items()}

    def out_features(self, in_features: int) -> int:
        return self.active_out_features


class ElasticEmbedding(nn.Module, ElasticModule):
    """Lookup table whose leading ``embed_dim`` columns are active (every row stays: any id may come in).

    Example::
        >>> wte = ElasticEmbedding(100, 64)
        >>> wte.set_active(embed_dim=48)
        >>> wte(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 48])
    """

    def __init__(self, num_embeddings: int, max_embed_dim: int):
        super().__init__()
        self.num_embeddings, self.max_embed_dim = num_embeddings, max_embed_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, max_embed_dim))
        nn.init.normal_(self.weight)  # nn.Embedding's default
        self.active_embed_dim = max_embed_dim

    def set_active(self, embed_dim: int | None = None) -> None:
        embed_dim = self.max_embed_dim if embed_dim is None else embed_dim
        if not 1 <= embed_dim <= self.max_embed_dim:
            raise ValueError(f"embed_dim={embed_dim!r}: expected 1..{self.max_embed_dim}")
        self.active_embed_dim = embed_dim

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight[:, : self.active_embed_dim])

    def used_slices(self, in_features: int) -> dict[str, Index]:
        # Every row: a row no id of the batch picks gets a zero gradient, as in a plain embedding (not a mask).
        return {"weight": (slice(None), slice(0, self.active_embed_dim))}

    def export_state(self, in_features: int) -> dict[str, torch.Tensor]:
        return {"weight": self.weight[:, : self.active_embed_dim].detach().clone()}

    def out_features(self, in_features: int) -> int:
        return self.active_embed_dim


class ElasticBatchNorm2d(nn.BatchNorm2d, ElasticModule):
    """BatchNorm over the leading ``C = x.shape[1]`` channels; running stats of the slice are updated in place.

    A subclass of ``nn.BatchNorm2d`` so code that looks for BN layers by type
    (recalibration, weight-decay filters) finds it.

    Example::
        >>> bn = ElasticBatchNorm2d(32)
        >>> bn(torch.randn(4, 12, 3, 3)).shape
        torch.Size([4, 12, 3, 3])
    """

    def __init__(self, max_features: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(max_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x_NCHW)
        C = x_NCHW.shape[1]
        if C > self.num_features:
            raise ValueError(f"input channels={C}: this layer holds at most {self.num_features}")
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # Slices of the running buffers are views: F.batch_norm updates the shared buffer in place.
        return F.batch_norm(
            x_NCHW,
            self.running_mean[:C],
            self.running_var[:C],
            self.weight[:C],
            self.bias[:C],
            self.training,
            factor,
            self.eps,
        )

    def used_slices(self, in_features: int) -> dict[str, Index]:
        return {"weight": (slice(0, in_features),), "bias": (slice(0, in_features),)}

    def export_state(self, in_features: int) -> dict[str, torch.Tensor]:
        C = in_features
        return {
            "weight": self.weight[:C].detach().clone(),
            "bias": self.bias[:C].detach().clone(),
            "running_mean": self.running_mean[:C].clone(),
            "running_var": self.running_var[:C].clone(),
            "num_batches_tracked": self.num_batches_tracked.clone(),
        }

    def out_features(self, in_features: int) -> int:
        return in_features


class ElasticLayerNorm(nn.LayerNorm, ElasticModule):
    """LayerNorm over the leading ``D = x.shape[-1]`` features.

    Example::
        >>> ln = ElasticLayerNorm(64)
        >>> ln(torch.randn(2, 5, 48)).shape
        torch.Size([2, 5, 48])
    """

    def __init__(self, max_features: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(max_features, eps=eps, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        return F.layer_norm(x, (D,), self.weight[:D], None if self.bias is None else self.bias[:D], self.eps)

    def used_slices(self, in_features: int) -> dict[str, Index]:
        return {name: (slice(0, in_features),) for name, _ in self.named_parameters()}

    def export_state(self, in_features: int) -> dict[str, torch.Tensor]:
        return {name: p[:in_features].detach().clone() for name, p in self.named_parameters()}

    def out_features(self, in_features: int) -> int:
        return in_features


class ElasticConvBNAct(nn.Module, ElasticComposite):
    """Elastic conv (dense or depthwise) + elastic BN + optional ReLU; mirrors ``subnets.ConvBNAct``.

    Example::
        >>> layer = ElasticConvBNAct(1, 16, kernel_sizes=[3])
        >>> layer.set_active(out_channels=12)
        >>> layer(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 12, 8, 8])
    """

    def __init__(
        self,
        max_in_channels: int,
        max_out_channels: int,
        kernel_sizes: Sequence[int] = (1,),
        stride: int = 1,
        depthwise: bool = False,
        act: bool = True,
        kernel_transform: bool = False,
    ):
        super().__init__()
        self.depthwise = depthwise
        if depthwise:
            if max_in_channels != max_out_channels:
                raise ValueError(f"depthwise needs max_in == max_out, got {max_in_channels} != {max_out_channels}")
            self.conv = ElasticDepthwiseConv2d(max_in_channels, kernel_sizes, stride, kernel_transform=kernel_transform)
        else:
            self.conv = ElasticConv2d(
                max_in_channels, max_out_channels, kernel_sizes, stride, kernel_transform=kernel_transform
            )
        self.bn = ElasticBatchNorm2d(max_out_channels)
        self.act = nn.ReLU() if act else nn.Identity()

    def set_active(self, out_channels: int | None = None, kernel_size: int | None = None) -> None:
        if self.depthwise:
            if out_channels is not None:
                raise ValueError(f"out_channels={out_channels!r}: a depthwise layer's width follows its input")
            self.conv.set_active(kernel_size=kernel_size)
        else:
            self.conv.set_active(out_channels=out_channels, kernel_size=kernel_size)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x_NCHW)))

    def layers(self, in_features: int) -> Iterable[Layer]:
        return chained([("conv", self.conv), ("bn", self.bn)], in_features)

    def out_features(self, in_features: int) -> int:
        return self.conv.out_features(in_features)


class ElasticInvertedResidual(nn.Module, ElasticComposite):
    """Inverted residual with elastic expand ratio, depthwise kernel and output width.

    The hidden width is ``make_divisible(in_channels * expand_ratio, channel_divisor)``
    with ``in_channels`` taken from the input (MobileNetV2 expands the input).
    ``residual`` is structural (fixed at construction): the supernet gives
    shortcuts only to blocks whose input and output widths always agree.

    Example::
        >>> block = ElasticInvertedResidual(16, 16, kernel_sizes=[3, 5], expand_ratios=[2, 4], residual=True)
        >>> block.set_active(out_channels=12, kernel_size=3, expand_ratio=2)
        >>> block(torch.zeros(2, 12, 4, 4)).shape
        torch.Size([2, 12, 4, 4])
    """

    def __init__(
        self,
        max_in_channels: int,
        max_out_channels: int,
        kernel_sizes: Sequence[int],
        expand_ratios: Sequence[float],
        stride: int = 1,
        residual: bool = False,
        kernel_transform: bool = False,
        channel_divisor: int = 4,
    ):
        super().__init__()
        self.expand_ratios = check_choices("expand_ratios", expand_ratios)
        self.channel_divisor = channel_divisor
        self.residual = residual
        if residual and (stride != 1 or max_in_channels != max_out_channels):
            raise ValueError(f"residual=True needs stride 1 and max_in == max_out, got stride={stride}")
        max_mid = make_divisible(max_in_channels * self.expand_ratios[-1], channel_divisor)
        self.expand = ElasticConvBNAct(max_in_channels, max_mid, (1,))
        self.depthwise = ElasticConvBNAct(
            max_mid, max_mid, kernel_sizes, stride, depthwise=True, kernel_transform=kernel_transform
        )
        self.project = ElasticConvBNAct(max_mid, max_out_channels, (1,), act=False)
        self.active_expand_ratio = self.expand_ratios[-1]

    def set_active(
        self, out_channels: int | None = None, kernel_size: int | None = None, expand_ratio: float | None = None
    ) -> None:
        expand_ratio = self.expand_ratios[-1] if expand_ratio is None else expand_ratio
        if expand_ratio not in self.expand_ratios:
            raise ValueError(f"expand_ratio={expand_ratio!r}: expected one of {self.expand_ratios}")
        self.active_expand_ratio = expand_ratio
        self.depthwise.set_active(kernel_size=kernel_size)
        self.project.set_active(out_channels=out_channels)

    def mid_channels(self, in_channels: int) -> int:
        return make_divisible(in_channels * self.active_expand_ratio, self.channel_divisor)

    def _follow_input(self, in_channels: int) -> None:
        self.expand.set_active(out_channels=self.mid_channels(in_channels))

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        self._follow_input(x_NCHW.shape[1])
        out = self.project(self.depthwise(self.expand(x_NCHW)))
        if self.residual:
            assert out.shape == x_NCHW.shape, "residual block must keep its width"
            return x_NCHW + out
        return out

    def layers(self, in_features: int) -> Iterable[Layer]:
        self._follow_input(in_features)
        return chained([("expand", self.expand), ("depthwise", self.depthwise), ("project", self.project)],
                       in_features)

    def out_features(self, in_features: int) -> int:
        return self.project.out_features(in_features)


class ElasticPatchEmbed(nn.Module, ElasticModule):
    """Patch embedding with elastic embedding dim: conv filters, class token and position embedding sliced alike.

    Example::
        >>> embed = ElasticPatchEmbed(1, 64, patch_size=2, num_patches=16)
        >>> embed.set_active(embed_dim=32)
        >>> embed(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 17, 32])
    """

    def __init__(self, in_channels: int, max_embed_dim: int, patch_size: int, num_patches: int):
        super().__init__()
        self.proj = ElasticConv2d(in_channels, max_embed_dim, (patch_size,), stride=patch_size, padding=0, bias=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, max_embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, max_embed_dim))
        self.max_embed_dim = max_embed_dim

    def set_active(self, embed_dim: int | None = None) -> None:
        self.proj.set_active(out_channels=embed_dim)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        D = self.proj.active_out_channels
        x_NTD = self.proj(x_NCHW).flatten(2).transpose(1, 2)
        cls_N1D = self.cls_token[..., :D].expand(x_NTD.shape[0], -1, -1)
        return torch.cat([cls_N1D, x_NTD], dim=1) + self.pos_embed[..., :D]

    def used_slices(self, in_features: int) -> dict[str, Index]:
        D = slice(0, self.proj.active_out_channels)
        tokens = (slice(None), slice(None), D)
        return {**prefixed("proj", self.proj.used_slices(in_features)), "cls_token": tokens, "pos_embed": tokens}

    def export_state(self, in_features: int) -> dict[str, torch.Tensor]:
        D = self.proj.active_out_channels
        return {
            **prefixed("proj", self.proj.export_state(in_features)),
            "cls_token": self.cls_token[..., :D].detach().clone(),
            "pos_embed": self.pos_embed[..., :D].detach().clone(),
        }

    def out_features(self, in_features: int) -> int:
        return self.proj.active_out_channels


class ElasticAttention(nn.Module, ElasticComposite):
    """Self-attention with elastic heads (fixed head_dim, so q/k/v width = heads * head_dim) and input dim.

    Example::
        >>> attn = ElasticAttention(64, max_num_heads=4, head_dim=16)
        >>> attn.set_active(num_heads=2)
        >>> attn(torch.zeros(2, 17, 48)).shape
        torch.Size([2, 17, 48])
    """

    def __init__(self, max_embed_dim: int, max_num_heads: int, head_dim: int):
        super().__init__()
        self.max_num_heads = max_num_heads
        self.head_dim = head_dim
        inner = max_num_heads * head_dim
        self.q = ElasticLinear(max_embed_dim, inner)
        # No key bias: it adds q.b to every score of a query, which softmax cancels, so its gradient is
        # always zero and the optimizer could only drift it.
        self.k = ElasticLinear(max_embed_dim, inner, bias=False)
        self.v = ElasticLinear(max_embed_dim, inner)
        self.proj = ElasticLinear(inner, max_embed_dim)
        self.active_num_heads = max_num_heads

    def set_active(self, num_heads: int | None = None) -> None:
        num_heads = self.max_num_heads if num_heads is None else num_heads
        if not 1 <= num_heads <= self.max_num_heads:
            raise ValueError(f"num_heads={num_heads!r}: expected 1..{self.max_num_heads}")
        self.active_num_heads = num_heads
        for layer in (self.q, self.k, self.v):
            layer.set_active(out_features=num_heads * self.head_dim)

    def _follow_input(self, in_features: int) -> None:
        self.proj.set_active(out_features=in_features)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        self._follow_input(x_NTD.shape[-1])
        out_NTE = multi_head_attention(self.q(x_NTD), self.k(x_NTD), self.v(x_NTD), self.active_num_heads)
        return self.proj(out_NTE)

    def layers(self, in_features: int) -> Iterable[Layer]:
        self._follow_input(in_features)
        inner = self.active_num_heads * self.head_dim  # q, k, v read the input; proj reads the heads
        return [("q", self.q, in_features), ("k", self.k, in_features), ("v", self.v, in_features),
                ("proj", self.proj, inner)]

    def out_features(self, in_features: int) -> int:
        return in_features


class ElasticMLP(nn.Module, ElasticComposite):
    """Two-layer GELU MLP whose hidden width is ``round(mlp_ratio * D)``, D from the input.

    Example::
        >>> mlp = ElasticMLP(64, max_mlp_ratio=4)
        >>> mlp.set_active(mlp_ratio=2)
        >>> mlp(torch.zeros(2, 17, 48)).shape
        torch.Size([2, 17, 48])
    """

    def __init__(self, max_embed_dim: int, max_mlp_ratio: float):
        super().__init__()
        self.max_mlp_ratio = max_mlp_ratio
        max_hidden = mlp_hidden_dim(max_embed_dim, max_mlp_ratio)
        self.fc1 = ElasticLinear(max_embed_dim, max_hidden)
        self.act = nn.GELU()
        self.fc2 = ElasticLinear(max_hidden, max_embed_dim)
        self.active_mlp_ratio = max_mlp_ratio

    def set_active(self, mlp_ratio: float | None = None) -> None:
        mlp_ratio = self.max_mlp_ratio if mlp_ratio is None else mlp_ratio
        if not 0 < mlp_ratio <= self.max_mlp_ratio:
            raise ValueError(f"mlp_ratio={mlp_ratio!r}: expected in (0, {self.max_mlp_ratio}]")
        self.active_mlp_ratio = mlp_ratio

    def hidden_features(self, in_features: int) -> int:
        return mlp_hidden_dim(in_features, self.active_mlp_ratio)

    def _follow_input(self, in_features: int) -> None:
        self.fc1.set_active(out_features=self.hidden_features(in_features))
        self.fc2.set_active(out_features=in_features)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        self._follow_input(x_NTD.shape[-1])
        return self.fc2(self.act(self.fc1(x_NTD)))

    def layers(self, in_features: int) -> Iterable[Layer]:
        self._follow_input(in_features)
        return chained([("fc1", self.fc1), ("fc2", self.fc2)], in_features)

    def out_features(self, in_features: int) -> int:
        return in_features


class ElasticTransformerBlock(nn.Module, ElasticComposite):
    """Pre-norm transformer block with elastic heads and MLP ratio; embedding dim follows the input.

    Example::
        >>> block = ElasticTransformerBlock(64, max_num_heads=4, head_dim=16, max_mlp_ratio=4)
        >>> block.set_active(num_heads=1, mlp_ratio=2)
        >>> block(torch.zeros(2, 17, 32)).shape
        torch.Size([2, 17, 32])
    """

    def __init__(self, max_embed_dim: int, max_num_heads: int, head_dim: int, max_mlp_ratio: float):
        super().__init__()
        self.norm1 = ElasticLayerNorm(max_embed_dim)
        self.attn = ElasticAttention(max_embed_dim, max_num_heads, head_dim)
        self.norm2 = ElasticLayerNorm(max_embed_dim)
        self.mlp = ElasticMLP(max_embed_dim, max_mlp_ratio)

    def set_active(self, num_heads: int | None = None, mlp_ratio: float | None = None) -> None:
        self.attn.set_active(num_heads=num_heads)
        self.mlp.set_active(mlp_ratio=mlp_ratio)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        x_NTD = x_NTD + self.attn(self.norm1(x_NTD))
        return x_NTD + self.mlp(self.norm2(x_NTD))

    def layers(self, in_features: int) -> Iterable[Layer]:
        # Residual stream: every layer reads (and the block outputs) the input's embedding dim.
        return [(name, getattr(self, name), in_features) for name in ("norm1", "attn", "norm2", "mlp")]

    def out_features(self, in_features: int) -> int:
        return in_features
