"""Fidelity and calibration metrics for evaluated checkpoints (METHODS.md §3).

Stanton et al. 2021, "Does knowledge distillation really work?": report, next to accuracy, how
closely the student matches its teacher — top-1 agreement and the predictive KL(p_T ‖ p_S) — plus
the expected calibration error (Guo et al. 2017). All metrics take logits; shapes are
``logits`` [N, K] and ``labels`` [N] (int64). Metrics are computed on CPU in float64 so the result
does not depend on the device or on float32 rounding of softmax outputs at bin edges. Pure torch:
no I/O, no logging.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _check_logits(logits: torch.Tensor, name: str = "logits") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [N, K], got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(logits.shape)})")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {logits.dtype}")
    return logits.detach().to("cpu", torch.float64)


def _check_labels(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be a 1-D tensor of length {n}, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    labels = labels.detach().to("cpu", torch.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def _check_pair(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = _check_logits(teacher_logits, "teacher_logits")
    s = _check_logits(student_logits, "student_logits")
    if t.shape != s.shape:
        raise ValueError(f"teacher_logits {tuple(t.shape)} and student_logits {tuple(s.shape)} differ in shape")
    return t, s


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the k highest logits; k is clipped to K.

    Ties at the k-th logit are broken by ``torch.topk`` (implementation order).
    """
    z = _check_logits(logits)
    y = _check_labels(labels, z.shape[0], z.shape[1])
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    top = z.topk(min(k, z.shape[1]), dim=1).indices  # [N, k]
    return (top == y[:, None]).any(dim=1).double().mean().item()


def top1_agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Top-1 agreement (Stanton et al. 2021): mean_i 1[argmax z_T,i = argmax z_S,i]."""
    t, s = _check_pair(teacher_logits, student_logits)
    return (t.argmax(dim=1) == s.argmax(dim=1)).double().mean().item()


def predictive_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean over samples of KL(p_T ‖ p_S), p = softmax(z/τ) (Stanton et al. 2021 use τ = 1).

    A fidelity metric, not the KD loss: no τ² factor. Computed from log_softmax for stability.
    """
    t, s = _check_pair(teacher_logits, student_logits)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    log_pt = torch.log_softmax(t / temperature, dim=1)
    log_ps = torch.log_softmax(s / temperature, dim=1)
    # xlogy-style guard: terms with p_T = 0 contribute 0 even if log p_S = -inf.
    terms = torch.where(log_pt > -math.inf, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_pt))
    return terms.sum(dim=1).mean().item()


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability diagram over max-softmax confidence (Guo et al. 2017).

    Equal-width bins (lo, hi] with edges i/n_bins (bin 0 also takes confidence 0). Returns numpy
    arrays of length n_bins: ``bin_lower``, ``bin_upper``, ``confidence`` (mean confidence per
    bin, nan if empty), ``accuracy`` (fraction correct, nan if empty), ``count`` (int64).
    """
    z = _check_logits(logits)
    y = _check_labels(labels, z.shape[0], z.shape[1])
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    conf, pred = torch.softmax(z, dim=1).max(dim=1)
    correct = (pred == y).double()
    # i / n_bins is correctly rounded (so e.g. 3/5 == 0.6), unlike a cumulative linspace step.
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    # bucketize(right=False) gives edges[b-1] < conf <= edges[b] for inner edges: (lo, hi] bins.
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    nonempty = count > 0
    nan = torch.full((n_bins,), math.nan, dtype=torch.float64)
    return {
        "bin_lower": edges[:-1].numpy(),
        "bin_upper": edges[1:].numpy(),
        "confidence": torch.where(nonempty, conf_sum / count.clamp_min(1), nan).numpy(),
        "accuracy": torch.where(nonempty, acc_sum / count.clamp_min(1), nan).numpy(),
        "count": count.to(torch.int64).numpy(),
    }


def ece_from_bins(bins: dict[str, np.ndarray]) -> float:
    """ECE = Σ_b (n_b / N)·|acc_b − conf_b| over non-empty bins of :func:`reliability_bins`."""
    count = np.asarray(bins["count"], dtype=np.float64)
    total = count.sum()
    if total <= 0:
        raise ValueError("reliability bins hold no sample")
    nonempty = count > 0
    gaps = np.abs(bins["accuracy"][nonempty] - bins["confidence"][nonempty])
    return float((count[nonempty] / total * gaps).sum())


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width (lo, hi] confidence bins."""
    return ece_from_bins(reliability_bins(logits, labels, n_bins))


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Top-1 accuracy per true class → float64 tensor [num_classes]; nan for a class with no sample."""
    z = _check_logits(logits)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    y = _check_labels(labels, z.shape[0], num_classes)
    correct = (z.argmax(dim=1) == y).double()
    count = torch.bincount(y, minlength=num_classes).double()
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, correct)
    return torch.where(count > 0, hits / count.clamp_min(1), torch.full_like(count, math.nan))


def fidelity_report(logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None, n_bins: int = 15) -> dict[str, float]:
    """All scalar metrics of one evaluated checkpoint.

    Keys: ``top1``, ``top5`` (top-min(5, K)), ``ece`` when ``labels`` is given; ``agreement``,
    ``kl`` (τ = 1) when ``teacher_logits`` is given. Raises ValueError on empty inputs or when
    neither labels nor teacher_logits is given (nothing to report).
    """
    _check_logits(logits)
    if labels is None and teacher_logits is None:
        raise ValueError("fidelity_report needs labels and/or teacher_logits")
    out: dict[str, float] = {}
    if labels is not None:
        out["top1"] = topk_accuracy(logits, labels, 1)
        out["top5"] = topk_accuracy(logits, labels, 5)
        out["ece"] = expected_calibration_error(logits, labels, n_bins)
    if teacher_logits is not None:
        out["agreement"] = top1_agreement(teacher_logits, logits)
        out["kl"] = predictive_kl(teacher_logits, logits, 1.0)
    return out
