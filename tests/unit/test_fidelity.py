"""Fidelity metrics against hand-computed values (METHODS.md §3)."""

import math

import numpy as np
import pytest
import torch

from kd3.methods.fidelity import (ece_from_bins, expected_calibration_error, fidelity_report,
                                  per_class_accuracy, predictive_kl, reliability_bins,
                                  top1_agreement, topk_accuracy)

# 4 samples, 3 classes. Top-1 predictions: 1, 0, 2, 1. Top-2 sets: {1,2}, {0,·}, {2,1}, {1,0}.
LOGITS = torch.tensor([[0.1, 0.5, 0.4],
                       [0.9, 0.05, 0.06],
                       [0.2, 0.3, 0.5],
                       [0.3, 0.6, 0.1]])
LABELS = torch.tensor([2, 0, 0, 1])


def test_topk_accuracy_by_hand():
    # top-1 hits: samples 2 and 4 → 2/4
    assert topk_accuracy(LOGITS, LABELS, 1) == pytest.approx(0.5)
    # top-2 hits: 1 (2 ∈ {1,2}), 2, 4; sample 3 misses (0 ∉ {2,1}) → 3/4
    assert topk_accuracy(LOGITS, LABELS, 2) == pytest.approx(0.75)
    # k = 5 is clipped to K = 3: every label is in the top-3 → 1
    assert topk_accuracy(LOGITS, LABELS, 5) == pytest.approx(1.0)


def test_top1_agreement_by_hand():
    teacher = torch.tensor([[1.0, 0, 0], [0, 2, 1], [0, 0, 3], [5, 4, 0]])  # argmax 0, 1, 2, 0
    student = torch.tensor([[2.0, 1, 0], [1, 0, 0], [0, 1, 2], [0, 4, 5]])  # argmax 0, 0, 2, 2
    assert top1_agreement(teacher, student) == pytest.approx(0.5)
    assert top1_agreement(teacher, teacher) == pytest.approx(1.0)


def test_predictive_kl_by_hand():
    # logits = log p, so softmax gives p back. Sample 1: p_T = (1/2, 1/2), p_S = (1/4, 3/4):
    # KL = 1/2·ln(2) + 1/2·ln(2/3) = 1/2·ln(4/3). Sample 2: identical → 0. Mean = 1/4·ln(4/3).
    teacher = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]], dtype=torch.float64))
    student = torch.log(torch.tensor([[0.25, 0.75], [0.2, 0.8]], dtype=torch.float64))
    assert predictive_kl(teacher, student) == pytest.approx(0.25 * math.log(4 / 3), rel=1e-9)
    assert predictive_kl(teacher, teacher) == pytest.approx(0.0, abs=1e-12)


def test_predictive_kl_temperature_by_hand():
    # τ = 2: teacher (2, 0)/2 = (1, 0) → p = e/(e+1); student (0, 0) → (1/2, 1/2).
    # KL = p·ln(2p) + (1−p)·ln(2(1−p)) ≈ 0.110944
    p = math.e / (math.e + 1)
    expected = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    got = predictive_kl(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), temperature=2.0)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(0.110944, abs=1e-6)


# 5 samples, 3 classes, logits = log p. 3 bins: (0,1/3], (1/3,2/3], (2/3,1].
ECE_PROBS = torch.tensor([[0.9, 0.05, 0.05],   # conf .9, pred 0, label 0 → right, bin 2
                          [0.2, 0.7, 0.1],     # conf .7, pred 1, label 0 → wrong, bin 2
                          [0.5, 0.3, 0.2],     # conf .5, pred 0, label 0 → right, bin 1
                          [0.4, 0.35, 0.25],   # conf .4, pred 0, label 2 → wrong, bin 1
                          [0.1, 0.3, 0.6]],    # conf .6, pred 2, label 2 → right, bin 1
                         dtype=torch.float64)  # float64 so log/softmax round-trips to 1e-12
ECE_LABELS = torch.tensor([0, 0, 0, 2, 2])


def test_ece_by_hand():
    # bin 1: mean conf (.5+.4+.6)/3 = .5, acc 2/3, n 3; bin 2: conf .8, acc 1/2, n 2; bin 0 empty.
    # ECE = 3/5·|2/3 − 1/2| + 2/5·|1/2 − 4/5| = 0.1 + 0.12 = 0.22
    ece = expected_calibration_error(torch.log(ECE_PROBS), ECE_LABELS, n_bins=3)
    assert ece == pytest.approx(0.22, abs=1e-9)


def test_reliability_bins_by_hand():
    bins = reliability_bins(torch.log(ECE_PROBS), ECE_LABELS, n_bins=3)
    np.testing.assert_allclose(bins["bin_lower"], [0.0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(bins["bin_upper"], [1 / 3, 2 / 3, 1.0])
    np.testing.assert_array_equal(bins["count"], [0, 3, 2])
    assert math.isnan(bins["confidence"][0]) and math.isnan(bins["accuracy"][0])
    np.testing.assert_allclose(bins["confidence"][1:], [0.5, 0.8], rtol=0, atol=1e-12)
    np.testing.assert_allclose(bins["accuracy"][1:], [2 / 3, 0.5], rtol=0, atol=1e-12)
    assert ece_from_bins(bins) == pytest.approx(0.22, abs=1e-9)


def test_bins_are_left_open_right_closed():
    # logits (0, 0) → confidence exactly 0.5 (pred 0): belongs to (0, 0.5], not (0.5, 1].
    # logits (0, -1000) → confidence exactly 1.0: the last bin.
    logits = torch.tensor([[0.0, 0.0], [0.0, -1000.0]])
    bins = reliability_bins(logits, torch.tensor([1, 0]), n_bins=2)
    np.testing.assert_array_equal(bins["count"], [1, 1])
    # bin 0: conf .5, acc 0; bin 1: conf 1, acc 1 → ECE = 1/2·0.5 + 1/2·0 = 0.25
    assert expected_calibration_error(logits, torch.tensor([1, 0]), n_bins=2) == pytest.approx(0.25)


def test_per_class_accuracy_by_hand():
    logits = torch.cat([LOGITS, torch.full((4, 1), -1.0)], dim=1)  # a 4th class nobody has
    acc = per_class_accuracy(logits, LABELS, 4)
    # class 0: samples 2 (right), 3 (wrong) → .5; class 1: sample 4 right → 1; class 2: sample 1
    # wrong → 0; class 3: no sample → nan
    assert acc[:3].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert math.isnan(acc[3].item())


def test_fidelity_report_keys_and_values():
    teacher = LOGITS.clone()
    teacher[0] = torch.tensor([0.1, 0.2, 0.9])  # argmax 2 vs student's 1; others agree → 3/4
    rep = fidelity_report(LOGITS, teacher_logits=teacher, labels=LABELS, n_bins=15)
    assert set(rep) == {"top1", "top5", "ece", "agreement", "kl"}
    assert rep["top1"] == pytest.approx(0.5)
    assert rep["top5"] == pytest.approx(1.0)
    assert rep["agreement"] == pytest.approx(0.75)
    assert rep["kl"] > 0
    assert set(fidelity_report(LOGITS, labels=LABELS)) == {"top1", "top5", "ece"}
    assert set(fidelity_report(LOGITS, teacher_logits=teacher)) == {"agreement", "kl"}


@pytest.mark.parametrize("call", [
    lambda: fidelity_report(torch.empty(0, 3), labels=torch.empty(0, dtype=torch.long)),
    lambda: fidelity_report(LOGITS),
    lambda: topk_accuracy(LOGITS, LABELS, 0),
    lambda: topk_accuracy(LOGITS, torch.tensor([0, 1, 2])),
    lambda: topk_accuracy(LOGITS, torch.tensor([0, 1, 2, 3])),
    lambda: top1_agreement(LOGITS, LOGITS[:3]),
    lambda: predictive_kl(LOGITS, LOGITS, temperature=0.0),
    lambda: expected_calibration_error(LOGITS, LABELS, n_bins=0),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
