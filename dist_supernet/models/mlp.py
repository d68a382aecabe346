"""A multilayer perceptron on flattened images: the default, small and quick on CPU."""

from collections.abc import Mapping

from torch import nn

from dist_supernet.models import register_model
from dist_supernet.models._checks import known_keys, positive_int_list, probability


class MLP(nn.Module):
    """``(B, C, H, W)`` -> flatten -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear.

    Example::
        >>> MLP(64, [32], 10)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


@register_model("mlp")
def build_mlp(cfg: Mapping, in_channels: int, image_size: int, num_classes: int) -> MLP:
    known_keys("mlp", cfg, ("hidden", "dropout"))
    hidden = positive_int_list("model.hidden", cfg.get("hidden", [128]))
    dropout = probability("model.dropout", cfg.get("dropout", 0.0))
    return MLP(in_channels * image_size * image_size, hidden, num_classes, dropout)
