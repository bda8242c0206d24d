"""ND loss: regularising the student's feature norm and direction (METHODS.md §4).

Wang et al. 2023, "Improving Knowledge Distillation via Regularizing Feature Norm and Direction":
the student embedding is pulled along the teacher's class-mean direction and encouraged to have a
norm at least as large as the teacher feature's. Class means come from one teacher pass over a
labelled set; in the data-free setting the labels are the teacher's pseudo-labels on the selected
web samples (our choice), or means shipped with the teacher checkpoint. Pure torch: no I/O.
"""

from __future__ import annotations

import torch
from torch import nn

from kd3.methods.precision import float32_loss


def teacher_class_means(features: torch.Tensor, labels: torch.Tensor,
                        num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """c_k = mean of T's pooled features over samples labelled k.

    ``features`` [N, D], ``labels`` [N] (true or teacher pseudo-labels) → (means [K, D] in the
    features' dtype, zero row for an empty class; counts [K] int64).
    """
    if features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a floating 2-D tensor [N, D], got {features.dtype} {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0] or labels.is_floating_point():
        raise ValueError(f"labels must be an integer 1-D tensor of length {features.shape[0]}, "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    labels = labels.to(features.device, torch.int64)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    feats = features.detach().to(torch.float64)  # exact-ish sums over large N
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64, device=feats.device)
    sums.index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=num_classes)
    means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    return means.to(features.dtype), counts


@float32_loss
def nd_loss(student_embedding: torch.Tensor, teacher_feature: torch.Tensor, labels: torch.Tensor,
            class_means: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """L_ND = (1/B) Σ_i [1 − ⟨f_s,i, c_y/‖c_y‖⟩ / max(‖f_s,i‖, ‖f_t,i‖)].

    ``student_embedding`` f_s [B, D] (after :class:`NDEmbeddingHead`), ``teacher_feature`` f_t
    [B, D] (T's pooled feature), ``labels`` y [B] (teacher pseudo-labels here), ``class_means``
    [K, D]. f_t and c are the frozen teacher's, so they are treated as constants. ``eps`` guards
    the divisions. Raises ValueError when a label's class mean is all-zero (class never seen).
    """
    if student_embedding.dim() != 2 or teacher_feature.shape != student_embedding.shape:
        raise ValueError(f"student_embedding {tuple(student_embedding.shape)} and teacher_feature "
                         f"{tuple(teacher_feature.shape)} must both be [B, D]")
    if student_embedding.shape[0] == 0:
        raise ValueError("nd_loss got an empty batch")
    if class_means.dim() != 2 or class_means.shape[1] != student_embedding.shape[1]:
        raise ValueError(f"class_means must be [K, {student_embedding.shape[1]}], got {tuple(class_means.shape)}")
    if labels.dim() != 1 or labels.shape[0] != student_embedding.shape[0] or labels.is_floating_point():
        raise ValueError(f"labels must be an integer 1-D tensor of length {student_embedding.shape[0]}")
    labels = labels.to(class_means.device, torch.int64)
    if labels.min() < 0 or labels.max() >= class_means.shape[0]:
        raise ValueError(f"labels must lie in [0, {class_means.shape[0] - 1}]")
    c = class_means.detach()[labels].to(student_embedding.device, student_embedding.dtype)  # [B, D]
    c_norm = c.norm(dim=1)
    if (c_norm == 0).any():
        missing = sorted({int(k) for k in labels[(c_norm == 0).to(labels.device)].tolist()})
        raise ValueError(f"class mean is all-zero for class(es) {missing}: no teacher sample of that class")
    direction = c / c_norm.clamp_min(eps).unsqueeze(1)
    f_t = teacher_feature.detach().to(student_embedding.dtype)
    denom = torch.maximum(student_embedding.norm(dim=1), f_t.norm(dim=1)).clamp_min(eps)
    return (1.0 - (student_embedding * direction).sum(dim=1) / denom).mean()


class NDEmbeddingHead(nn.Module):
    """Student embedding f_s: pooled S feature [B, in_dim] → BN1d → Dropout → Linear → [B, out_dim]."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"in_dim and out_dim must be positive, got {in_dim}, {out_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.bn = nn.BatchNorm1d(in_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(self.bn(pooled)))
