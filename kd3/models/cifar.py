"""CIFAR-style networks of the KD³ paper's teacher/student pairs (32x32 inputs).

Module names follow the public CIFAR code most data-free KD work shares, so a user's trained
weights load without renaming:

* :class:`CifarResNet` — the DAFL/CMI/kuangliu ResNet: ``conv1``, ``bn1``, ``layer1..4`` (BasicBlock
  with ``shortcut``), ``linear``. 3x3 stem, stride 1, no max-pool; stages 64-128-256-512 with strides
  1-2-2-2, so a 32x32 image gives a 4x4x512 feature map.
* :class:`WideResNet` — Zagoruyko & Komodakis (2016) as in the xternalz/CMI code: ``conv1``,
  ``block1..3.layer.N`` (pre-activation ``bn1/relu1/conv1/bn2/relu2/conv2`` + ``convShortcut``),
  final ``bn1``, ``fc``. Widths 16k-32k-64k, strides 1-2-2: 32x32 → 8x8x(64k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd3.errors import Kd3Error
from kd3.models.base import Kd3Model


# --------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN (ReLU between) + identity or 1x1 conv-BN shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Kd3Model):
    """CIFAR ResNet (He et al. 2016, CIFAR variant): [B, C_in, 32, 32] → map [B, 512, 4, 4] → [B, K]."""

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int, in_channels: int = 3,
                 widths: tuple[int, int, int, int] = (64, 128, 256, 512)):
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], num_blocks[0], stride=1)
        self.layer2 = self._make_layer(widths[1], num_blocks[1], stride=2)
        self.layer3 = self._make_layer(widths[2], num_blocks[2], stride=2)
        self.layer4 = self._make_layer(widths[3], num_blocks[3], stride=2)
        self.linear = nn.Linear(widths[3], num_classes)
        self.feature_channels = self.feature_dim = widths[3]
        self.num_classes = num_classes

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def classifier(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled)


# ---------------------------------------------------------------------------------- Wide ResNet
class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + (1x1 conv) shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.droprate = dropout
        self.equalInOut = in_planes == out_planes  # noqa: N815 (the original code's name)
        # convShortcut: the original code's name, hence its state-dict key
        self.convShortcut = (None if self.equalInOut  # noqa: N815
                             else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # when the shapes differ, the shortcut also starts from the pre-activated input (original code)
        act = self.relu1(self.bn1(x))
        shortcut = x if self.equalInOut else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        return self.conv2(out) + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                    stride if i == 0 else 1, dropout) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(Kd3Model):
    """WRN-depth-k (Zagoruyko & Komodakis 2016): [B, C_in, 32, 32] → map [B, 64k, 8, 8] → [B, K].

    ``depth`` must be 6n+4 (n blocks per stage): 16, 28, 40, …
    """

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 16, widen_factor: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise Kd3Error(f"wrn: option depth must be 6n+4 with n >= 1 (e.g. 16, 28, 40), got {depth!r}")
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise Kd3Error(f"wrn: option widen_factor must be a positive int, got {widen_factor!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise Kd3Error(f"wrn: option dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, float(dropout))
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, float(dropout))
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, float(dropout))
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_channels = self.feature_dim = widths[3]
        self.num_classes = num_classes
        for m in self.modules():  # the original initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(out))

    def classifier(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)
