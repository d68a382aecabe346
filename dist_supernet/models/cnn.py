"""A small convolutional network: conv stages that halve the resolution, then a linear head."""

from collections.abc import Mapping

from torch import nn

from dist_supernet.models import register_model
from dist_supernet.models._checks import known_keys, positive_int_list, probability


class CNN(nn.Module):
    """``(B, C, H, W)`` -> [Conv3x3 -> BatchNorm -> ReLU -> MaxPool2] per stage -> global avg pool -> Linear.

    A stage pools only while the feature map is larger than 1x1, so any image
    size works (8x8 digits through 3 stages: 8 -> 4 -> 2 -> 1).

    Example::
        >>> CNN(1, 8, [8, 16], 10)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, image_size: int, channels: list[int], num_classes: int,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width, size = in_channels, image_size
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            if size > 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            width = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes)
        )

    def forward(self, x):
        return self.head(self.features(x))


@register_model("cnn")
def build_cnn(cfg: Mapping, in_channels: int, image_size: int, num_classes: int) -> CNN:
    known_keys("cnn", cfg, ("channels", "dropout"))
    channels = positive_int_list("model.channels", cfg.get("channels", [16, 32]))
    dropout = probability("model.dropout", cfg.get("dropout", 0.0))
    return CNN(in_channels, image_size, channels, num_classes, dropout)
