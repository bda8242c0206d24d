"""Small CNNs for the embedded demo (teacher and a smaller student)."""

from __future__ import annotations

from torch import nn

from kd3.models.base import Kd3Model


def _conv_block(c_in: int, c_out: int, n_convs: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return layers


class SmallCNN(Kd3Model):
    """Stages of 3x3 conv-BN-ReLU, each halving the resolution except the last, then GAP + linear.

    ``widths`` gives one channel count per stage; for 32x32 inputs and 3 stages the last feature
    map is 8x8.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128),
                 convs_per_stage: int = 2, dropout: float = 0.0):
        super().__init__()
        if not widths:
            raise ValueError("SmallCNN needs at least one stage width")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, width in enumerate(widths):
            layers += _conv_block(c_in, width, convs_per_stage)
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_channels = self.feature_dim = c_in
        self.num_classes = num_classes

    def forward_features(self, x):
        return self.features(x)

    def classifier(self, pooled):
        return self.fc(self.dropout(pooled))
