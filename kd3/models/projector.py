"""KD³ feature projector P (METHODS.md §1b) and contrastive embedding head g (§1d)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """SimKD-style projector: student map [B, C_S, h, w] → [B, C_T, H, W] (METHODS.md §1b).

    1x1 conv → BN → ReLU → 3x3 conv (pad 1) → BN → ReLU → 1x1 conv → BN → ReLU, hidden width
    max(1, C_T // factor). Convs have no bias (each is followed by BN, which has its own shift).
    """

    def __init__(self, student_channels: int, teacher_channels: int, factor: int = 2):
        super().__init__()
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels),
                            ("factor", factor)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        hidden = max(1, teacher_channels // factor)
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.net = nn.Sequential(
            nn.Conv2d(student_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, student_map: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Resize the student map to ``output_size`` (the teacher map's H, W) if needed, then project.

        Shrinking uses adaptive average pooling (every input position contributes, no aliasing; the
        reference's choice). Growing uses bilinear interpolation: adaptive pooling to a larger size
        would only replicate pixels into blocks. When one side grows and the other shrinks, the
        map is first pooled down on the shrinking side, then interpolated up.
        """
        if student_map.dim() != 4 or student_map.shape[1] != self.student_channels:
            raise ValueError(f"student_map must be [B, {self.student_channels}, h, w], got {tuple(student_map.shape)}")
        if output_size is not None:
            if (len(output_size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                             for s in output_size)):
                raise ValueError(f"output_size must be two positive ints, got {output_size!r}")
            student_map = resize_feature_map(student_map, (output_size[0], output_size[1]))
        return self.net(student_map)


def resize_feature_map(feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, h, w] → [B, C, H, W]: adaptive average pool where shrinking, bilinear where growing."""
    h, w = feature_map.shape[-2:]
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return feature_map
    if out_h < h or out_w < w:
        feature_map = F.adaptive_avg_pool2d(feature_map, (min(h, out_h), min(w, out_w)))
    if out_h > h or out_w > w:
        feature_map = F.interpolate(feature_map, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return feature_map


class EmbeddingHead(nn.Module):
    """Contrastive head g (METHODS.md §1d): Linear(in_dim → out_dim), then L2-normalise along dim 1.

    [B, in_dim] → [B, out_dim] with unit-norm rows.
    """

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if pooled.dim() != 2 or pooled.shape[1] != self.linear.in_features:
            raise ValueError(f"input must be [B, {self.linear.in_features}], got {tuple(pooled.shape)}")
        return F.normalize(self.linear(pooled), dim=1)
