"""KD³ dynamic sample selection by combined teacher/student predictions (METHODS.md §1a).

Every epoch the whole web pool is scored with combined logits ẑ = α_e·z_T + (1−α_e)·z_S and a
sample is kept when its confidence beats a class-adaptive (FlexMatch-like) threshold. The known
failure modes of the reference formulas (METHODS.md §6: class collapse of distractors, α jump) are
exposed as opt-in guards (``threshold_floor``, ``max_class_share``, the "smooth" schedule) whose
defaults reproduce the reference behaviour, plus diagnostics (``counts``, ``dominant_class``).
Pure torch: no I/O, no logging; callers log the returned diagnostics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALPHA_MODES = ("reference", "absolute", "smooth")

# Reference-code constants (E_ref = 240 epochs, warm window 160, cut at 120).
_REF_EPOCHS, _REF_WARM, _REF_CUT = 240.0, 160.0, 120.0


def alpha_schedule(epoch: int, total_epochs: int, mode: str = "reference") -> float:
    """Teacher weight α_e of the combined logits (METHODS.md §1a, §6 "α jumps").

    α_e = 1 − exp(−5·((e+1)/warm − 1)²) with

    - ``"reference"``: warm = E·160/240, cut = E·120/240; α_e = 0 for e ≥ cut (relative form of
      the reference code, so short runs keep the shape);
    - ``"absolute"``: warm = 160, cut = 120 whatever E is (the reference code verbatim);
    - ``"smooth"``: relative warm, no cut: the formula while e+1 < warm, 0 from e+1 ≥ warm.
      The formula is 0 at e+1 = warm, so α decays continuously to 0 instead of jumping from ≈0.27.

    ``epoch`` is 0-based and must satisfy 0 ≤ epoch < total_epochs.
    """
    if mode not in ALPHA_MODES:
        raise ValueError(f"unknown alpha schedule mode {mode!r}; valid choices: {', '.join(ALPHA_MODES)}")
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"total_epochs must be a positive int, got {total_epochs!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be an int in [0, {total_epochs - 1}] (0-based, total_epochs="
                         f"{total_epochs}), got {epoch!r}")
    if mode == "absolute":
        warm, cut = _REF_WARM, _REF_CUT
    else:
        warm = total_epochs * _REF_WARM / _REF_EPOCHS
        cut = total_epochs * _REF_CUT / _REF_EPOCHS
    if mode == "smooth":
        if epoch + 1 >= warm:
            return 0.0
    elif epoch >= cut:
        return 0.0
    return 1.0 - math.exp(-5.0 * ((epoch + 1) / warm - 1.0) ** 2)


def class_thresholds(labels: torch.Tensor, confidences: torch.Tensor, num_classes: int,
                     threshold: float = 0.95, threshold_floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-adaptive thresholds θ_k (METHODS.md §1a).

    n_k = #{i : ŷ_i = k and c_i > θ}, β_k = n_k / max_j n_j, θ_k = max(θ·β_k/(2−β_k), floor).

    Edge cases: a class with n_k = 0 gets β_k = 0, hence θ_k = 0 (reference behaviour: every
    sample predicted as that class passes — ``threshold_floor`` is the guard); when all n_k = 0,
    β is undefined and we use β_k = 1, i.e. θ_k = θ for every class.

    Shapes: labels [N] (long, in [0, K)), confidences [N] → (thresholds [K] float, counts [K] long).
    """
    _check_int("num_classes", num_classes, minimum=1)
    _check_unit("threshold", threshold)
    _check_unit("threshold_floor", threshold_floor)
    if labels.dim() != 1 or confidences.dim() != 1 or labels.shape != confidences.shape:
        raise ValueError(f"labels and confidences must be 1-D of equal length, got {tuple(labels.shape)} "
                         f"and {tuple(confidences.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    dtype = confidences.dtype if confidences.is_floating_point() else torch.float32
    counts = torch.bincount(labels[confidences > threshold].long(), minlength=num_classes)
    max_count = int(counts.max())
    if max_count == 0:
        beta = torch.ones(num_classes, dtype=dtype, device=confidences.device)
    else:
        beta = counts.to(dtype) / max_count
    thresholds = (threshold * beta / (2.0 - beta)).clamp_min(threshold_floor)
    return thresholds, counts


@dataclass
class SelectionResult:
    """One epoch's selection over the pool. Shapes: N = pool size, K = classes.

    ``mask`` bool [N]; ``labels`` long [N] (pseudo-labels ŷ, kept for the manifest, not a loss
    target); ``confidences`` [N]; ``thresholds`` [K]; ``counts`` long [K] (confident samples per
    class, n_k); ``selected_per_class`` long [K]; ``fallback_used``: the rule selected nothing and
    the most confident samples were taken instead; ``dominant_class``: a class holding more than
    ``dominance_fraction`` of the confident samples (class-collapse warning, §6), else None;
    ``alpha``: the teacher weight of the combined predictions the rule used.
    """

    mask: torch.Tensor
    labels: torch.Tensor
    confidences: torch.Tensor
    thresholds: torch.Tensor
    counts: torch.Tensor
    selected_per_class: torch.Tensor
    fallback_used: bool
    dominant_class: int | None
    #: teacher weight α of the combined predictions (1 when only the teacher's predictions count)
    alpha: float = 1.0

    @property
    def num_selected(self) -> int:
        return int(self.mask.sum())


def select_dynamic(teacher_logits: torch.Tensor, student_logits: torch.Tensor | None, alpha: float,
                   threshold: float = 0.95, threshold_floor: float = 0.0, max_class_share: float | None = None,
                   min_selected: int = 1, dominance_fraction: float = 0.5) -> SelectionResult:
    """KD³ selection (METHODS.md §1a): keep i when c_i > θ_{ŷ_i} (strict), on ẑ = α·z_T + (1−α)·z_S.

    Logits [N, K]; ``student_logits`` may be None only when α = 1. Computed without gradients.

    Guards (defaults = reference behaviour):

    - ``threshold_floor``: lower bound on every θ_k (see :func:`class_thresholds`).
    - ``max_class_share`` in (0, 1] (None = off): with n_sel samples selected by the rule, each
      class keeps at most cap = max(1, floor(share·n_sel)) of its selected samples, its most
      confident ones (ties → lower index). The cap is computed once from n_sel before capping, so
      after capping a class may hold a larger share of the (smaller) final set.
    - empty selection (N > 0): the ``min_selected`` most confident samples overall are kept and
      ``fallback_used`` is set; the fallback set is not capped. N = 0 gives an empty result.
    """
    _check_logits("teacher_logits", teacher_logits)
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    teacher_logits = teacher_logits.detach()
    if student_logits is None:
        if alpha != 1.0:
            raise ValueError(f"student_logits may be None only when alpha == 1, got alpha={alpha}")
        combined = teacher_logits
    else:
        _check_logits("student_logits", student_logits)
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                             f"{tuple(student_logits.shape)} must have the same shape")
        student_logits = student_logits.detach()
        # α at the ends uses one side exactly (no 0·z rounding on the other side).
        if alpha == 1.0:
            combined = teacher_logits
        elif alpha == 0.0:
            combined = student_logits
        else:
            combined = alpha * teacher_logits + (1.0 - alpha) * student_logits
    confidences, labels = _confidence_and_label(combined)
    num_classes = teacher_logits.shape[1]
    thresholds, counts = class_thresholds(labels, confidences, num_classes, threshold, threshold_floor)
    mask = confidences > thresholds[labels]
    if max_class_share is not None:
        if not 0.0 < float(max_class_share) <= 1.0:
            raise ValueError(f"max_class_share must be in (0, 1] or None, got {max_class_share}")
        # epsilon so that e.g. 0.29·100 (= 28.999…96 in floating point) floors to 29
        cap = max(1, math.floor(float(max_class_share) * int(mask.sum()) + 1e-9))
        mask = _cap_per_class(mask, labels, confidences, num_classes, cap)
    result = _finish(mask, labels, confidences, thresholds, counts, min_selected, dominance_fraction)
    result.alpha = alpha
    return result


def select_by_teacher_confidence(teacher_logits: torch.Tensor, threshold: float,
                                 per_class_cap: int | None = None, *, min_selected: int = 1,
                                 dominance_fraction: float = 0.5) -> SelectionResult:
    """Baseline rule: keep i when max_k softmax(z_T)_ik ≥ ``threshold`` (non-strict).

    ``per_class_cap`` (None = off) keeps at most that many samples per pseudo-class, the most
    confident ones. ``thresholds`` is ``threshold`` for every class and ``counts`` are the samples
    per class that pass it. Same empty-selection fallback and diagnostics as :func:`select_dynamic`.
    Logits [N, K].
    """
    _check_logits("teacher_logits", teacher_logits)
    _check_unit("threshold", threshold)
    confidences, labels = _confidence_and_label(teacher_logits.detach())
    num_classes = teacher_logits.shape[1]
    mask = confidences >= threshold
    counts = torch.bincount(labels[mask], minlength=num_classes)
    thresholds = torch.full((num_classes,), float(threshold), dtype=confidences.dtype,
                            device=confidences.device)
    if per_class_cap is not None:
        _check_int("per_class_cap", per_class_cap, minimum=1)
        mask = _cap_per_class(mask, labels, confidences, num_classes, per_class_cap)
    return _finish(mask, labels, confidences, thresholds, counts, min_selected, dominance_fraction)


# ---------------------------------------------------------------------------------------------
# shared helpers


def _confidence_and_label(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c = max_k softmax(z), ŷ = argmax_k (float32 at least, so half-precision caches compare well)."""
    probs = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=1)
    confidences, labels = probs.max(dim=1)
    return confidences, labels


def _cap_per_class(mask: torch.Tensor, labels: torch.Tensor, confidences: torch.Tensor,
                   num_classes: int, cap: int) -> torch.Tensor:
    """Within each class keep the ``cap`` most confident selected samples (ties → lower index)."""
    idx = mask.nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        return mask
    # stable sort by confidence (descending), then stable sort by class: within a class the order
    # stays by decreasing confidence, so the rank inside the class is position − class start.
    order = idx[torch.sort(confidences[idx], descending=True, stable=True).indices]
    order = order[torch.sort(labels[order], stable=True).indices]
    sorted_labels = labels[order]
    per_class = torch.bincount(sorted_labels, minlength=num_classes)
    starts = torch.cumsum(per_class, 0) - per_class
    rank = torch.arange(order.numel(), device=mask.device) - starts[sorted_labels]
    capped = torch.zeros_like(mask)
    capped[order[rank < cap]] = True
    return capped


def _finish(mask: torch.Tensor, labels: torch.Tensor, confidences: torch.Tensor,
            thresholds: torch.Tensor, counts: torch.Tensor, min_selected: int,
            dominance_fraction: float) -> SelectionResult:
    """Empty-selection fallback + per-class diagnostics, shared by both selection rules."""
    _check_int("min_selected", min_selected, minimum=1)
    _check_unit("dominance_fraction", dominance_fraction)
    n = mask.numel()
    fallback = False
    if n > 0 and not bool(mask.any()):
        k = min(min_selected, n)
        top = torch.sort(confidences, descending=True, stable=True).indices[:k]
        mask = torch.zeros_like(mask)
        mask[top] = True
        fallback = True
    total = int(counts.sum())
    dominant = None
    if total > 0:
        top_count, top_class = counts.max(dim=0)
        if int(top_count) / total > dominance_fraction:
            dominant = int(top_class)
    return SelectionResult(
        mask=mask, labels=labels, confidences=confidences, thresholds=thresholds, counts=counts,
        selected_per_class=torch.bincount(labels[mask], minlength=thresholds.numel()),
        fallback_used=fallback, dominant_class=dominant)


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a [N, K] tensor with K >= 1, got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {logits.dtype}")
    # a diverged student gives NaN logits; selecting from them would silently train on garbage
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _check_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
