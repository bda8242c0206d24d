"""The uniform model interface every kd3 teacher and student follows.

KD³'s alignment losses need a network split into a *backbone* (image → last feature map) and a
*head* (feature map → logits: global pool + linear classifier), because the student's projected
feature map is fed through the teacher's frozen head (METHODS.md §1b). Every architecture in the
registry is therefore a :class:`Kd3Model` or is wrapped into one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FeatureOutput:
    """What one forward pass exposes to the losses.

    Shapes: ``feature_map`` [B, C, H, W] (last map before pooling), ``pooled`` [B, D],
    ``logits`` [B, K].
    """

    feature_map: torch.Tensor
    pooled: torch.Tensor
    logits: torch.Tensor


class Kd3Model(nn.Module):
    """Backbone + (pool → classifier) head. Subclasses implement the three parts."""

    #: channel count C of ``forward_features``' output
    feature_channels: int
    #: dimension D of the pooled feature
    feature_dim: int
    num_classes: int
    #: False when ``head(feature_map)`` cannot reproduce the logits (e.g. a ViT that pools its class
    #: token, which a patch-token map does not contain); ``head``/``pool`` then raise a Kd3Error and
    #: only logits + pooled features (``extract``/``forward``) are available: no KD³ feature alignment
    supports_feature_alignment: bool = True
    #: attribute path (with trailing dot) of the wrapped library module whose state-dict keys match
    #: the library's own checkpoints, e.g. ``"net."`` for torchvision/timm; ``""`` when kd3 owns the
    #: module names (CIFAR ResNet/WRN use the names of the widely used public CIFAR code)
    native_prefix: str = ""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch [B, C_in, H, W] → last feature map [B, C, h, w]."""
        raise NotImplementedError

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Feature map → pooled feature [B, D]. Default: global average pool."""
        return feature_map.mean(dim=(2, 3))

    def classifier(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled feature [B, D] → logits [B, K]."""
        raise NotImplementedError

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Feature map → logits (pool + classifier): the part KD³ shares with the student."""
        return self.classifier(self.pool(feature_map))

    def extract(self, x: torch.Tensor) -> FeatureOutput:
        feature_map = self.forward_features(x)
        pooled = self.pool(feature_map)
        return FeatureOutput(feature_map=feature_map, pooled=pooled, logits=self.classifier(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
