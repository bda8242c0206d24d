"""KD³ loss terms: weighted feature alignment (METHODS.md §1c) and NT-Xent (§1d). Pure torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd3.methods.precision import float32_loss

FEATURE_WEIGHT_MODES = ("sigmoid", "batch_normalised")


@float32_loss
def feature_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str = "sigmoid",
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-sample weights w_i (METHODS.md §1c, §6 "sample weights are nearly constant"), detached.

    ``"sigmoid"``: w_i = sigmoid(‖z_S,i − z_T,i‖₂ / temperature) (the paper: temperature 1).
    ``"batch_normalised"``: those weights divided by their batch mean (mean 1), so the loss scale
    no longer depends on how far apart the logits are. Logits [B, K] → weights [B].
    """
    if mode not in FEATURE_WEIGHT_MODES:
        raise ValueError(f"unknown feature weight mode {mode!r}; valid choices: {', '.join(FEATURE_WEIGHT_MODES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must both be [B, K] of the same shape")
    with torch.no_grad():
        distance = torch.linalg.vector_norm(student_logits - teacher_logits, dim=1)
        weights = torch.sigmoid(distance / temperature)
        if mode == "batch_normalised" and weights.numel():
            weights = weights / weights.mean()  # sigmoid > 0, so the mean is never 0
    return weights.detach()


@float32_loss
def weighted_feature_alignment(projected_student_map: torch.Tensor, teacher_map: torch.Tensor,
                               weights: torch.Tensor) -> torch.Tensor:
    """L_fa = (1/B) Σ_i w_i · m_i, m_i = mean over elements of (P(F_S,i) − F_T,i)² (METHODS.md §1c).

    Maps [B, ...] of equal shape, weights [B]. The teacher map and the weights are treated as
    constants (detached): the teacher is frozen and w_i is a weight, not a learning signal.
    Returns a scalar; an empty batch gives 0 (still attached to the student's graph).
    """
    if projected_student_map.shape != teacher_map.shape:
        raise ValueError(f"projected student map {tuple(projected_student_map.shape)} and teacher map "
                         f"{tuple(teacher_map.shape)} must have the same shape")
    if projected_student_map.dim() < 1:
        raise ValueError("feature maps need a batch dimension")
    batch = projected_student_map.shape[0]
    if weights.shape != (batch,):
        raise ValueError(f"weights must have shape ({batch},), got {tuple(weights.shape)}")
    if batch == 0:
        return projected_student_map.sum() * 0.0
    diff = projected_student_map - teacher_map.detach()
    per_sample = diff.pow(2).reshape(batch, -1).mean(dim=1)
    return (weights.detach().to(per_sample.dtype) * per_sample).mean()


@float32_loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.3) -> torch.Tensor:
    """SimCLR NT-Xent (METHODS.md §1d) between two views z1, z2 [B, D].

    The 2B embeddings are L2-normalised here; anchor i's positive is i+B (and vice versa), its own
    similarity is excluded from the denominator, and the loss is the mean over the 2B anchors:
    ℓ_i = −log( exp(s_i,pos/t) / Σ_{j≠i} exp(s_ij/t) ).
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must both be [B, D] of the same shape")
    if z1.shape[0] < 1:
        raise ValueError("nt_xent needs at least one pair (B >= 1)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * batch, dtype=torch.bool, device=z.device), float("-inf"))
    targets = (torch.arange(2 * batch, device=z.device) + batch) % (2 * batch)
    return F.cross_entropy(sim, targets)
