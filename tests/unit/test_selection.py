"""KD³ dynamic selection (METHODS.md §1a). Golden values are worked out by hand / with `math`."""

import math

import pytest
import torch

from kd3.methods.selection import (
    alpha_schedule,
    class_thresholds,
    select_by_teacher_confidence,
    select_dynamic,
)

# ----------------------------------------------------------------------------- alpha schedule


@pytest.mark.parametrize("mode, epoch, total, expected", [
    # relative form, E = 240 equals the reference constants: warm 160, cut 120
    ("reference", 0, 240, 0.9928288934985168),    # 1 - exp(-5*(1/160 - 1)**2)
    ("reference", 119, 240, 0.2683843710533582),  # 1 - exp(-5*(120/160 - 1)**2) = 1 - exp(-0.3125)
    ("reference", 120, 240, 0.0),                 # e >= cut
    ("reference", 239, 240, 0.0),
    # relative form, E = 10: warm = 20/3, cut = 5
    ("reference", 0, 10, 0.9730156982841975),     # 1 - exp(-5*(0.15 - 1)**2) = 1 - exp(-3.6125)
    ("reference", 4, 10, 0.2683843710533582),     # (5/(20/3) - 1)**2 = 0.0625
    ("reference", 5, 10, 0.0),                    # e = 5 >= cut = 5
    # absolute: warm 160, cut 120 whatever E is
    ("absolute", 0, 10, 0.9928288934985168),
    ("absolute", 119, 300, 0.2683843710533582),
    ("absolute", 120, 300, 0.0),
    ("absolute", 200, 300, 0.0),
    # smooth: relative warm, no cut; 0 from e+1 >= warm
    ("smooth", 4, 10, 0.2683843710533582),
    ("smooth", 5, 10, 0.048770575499286095),      # (6/(20/3) - 1)**2 = 0.01 -> 1 - exp(-0.05)
    ("smooth", 6, 10, 0.0),                       # 7 >= 20/3
    ("smooth", 120, 240, 0.25700823108347426),    # 1 - exp(-5*(121/160 - 1)**2), past the cut
    ("smooth", 158, 240, 0.00019529342775537195),  # 1 - exp(-5*(1/160)**2)
    ("smooth", 159, 240, 0.0),                    # e+1 = 160 = warm
])
def test_alpha_schedule_golden(mode, epoch, total, expected):
    assert alpha_schedule(epoch, total, mode) == pytest.approx(expected, abs=1e-12)


def test_alpha_schedule_invalid_inputs_name_value_and_choices():
    with pytest.raises(ValueError, match=r"'cosine'.*reference, absolute, smooth"):
        alpha_schedule(0, 10, "cosine")
    with pytest.raises(ValueError, match="-1"):
        alpha_schedule(-1, 10)
    with pytest.raises(ValueError, match="10"):
        alpha_schedule(10, 10)
    with pytest.raises(ValueError):
        alpha_schedule(0, 0)


# ----------------------------------------------------------------------------- thresholds


def _counts_420():
    """Pseudo-labels/confidences (float64) with n = [4, 2, 0] at threshold = 0.95."""
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 1, 0])
    # the last one equals threshold exactly and must not count (strict c > threshold)
    conf = torch.tensor([0.99, 0.96, 0.97, 0.951, 0.99, 0.98, 0.5, 0.3, 0.95], dtype=torch.float64)
    return labels, conf


def test_class_thresholds_golden():
    labels, conf = _counts_420()
    thresholds, counts = class_thresholds(labels, conf, num_classes=3, threshold=0.95)
    assert counts.tolist() == [4, 2, 0]
    # beta = [1, 0.5, 0]; tau_k = 0.95 * beta / (2 - beta)
    assert thresholds.tolist() == pytest.approx([0.95, 0.95 * 0.5 / 1.5, 0.0], abs=1e-12)
    assert thresholds[1].item() == pytest.approx(0.31666666666666665, abs=1e-12)


def test_class_thresholds_beta_one_third():
    labels = torch.tensor([0, 0, 0, 1])
    conf = torch.tensor([0.99, 0.99, 0.99, 0.99])
    thresholds, counts = class_thresholds(labels, conf, num_classes=2, threshold=0.95)
    assert counts.tolist() == [3, 1]
    # beta = 1/3 -> 0.95 * (1/3) / (5/3) = 0.19
    assert thresholds.tolist() == pytest.approx([0.95, 0.19], abs=1e-6)


def test_class_thresholds_all_zero_counts_give_tau():
    labels = torch.tensor([0, 1, 2, 2])
    conf = torch.tensor([0.5, 0.9, 0.94, 0.2])
    thresholds, counts = class_thresholds(labels, conf, num_classes=4, threshold=0.9)
    # 0.94 > 0.9 -> class 2 has one; redo with threshold above every confidence
    assert counts.tolist() == [0, 0, 1, 0]
    thresholds, counts = class_thresholds(labels, conf, num_classes=4, threshold=0.95)
    assert counts.tolist() == [0, 0, 0, 0]
    assert thresholds.tolist() == pytest.approx([0.95] * 4)


def test_class_thresholds_floor():
    labels, conf = _counts_420()
    thresholds, _ = class_thresholds(labels, conf, num_classes=3, threshold=0.95, threshold_floor=0.5)
    assert thresholds.tolist() == pytest.approx([0.95, 0.5, 0.5], abs=1e-12)


def test_class_thresholds_rejects_bad_input():
    with pytest.raises(ValueError, match="labels must lie"):
        class_thresholds(torch.tensor([0, 3]), torch.tensor([0.9, 0.9]), num_classes=3)
    with pytest.raises(ValueError, match="equal length"):
        class_thresholds(torch.tensor([0, 1]), torch.tensor([0.9]), num_classes=3)
    with pytest.raises(ValueError, match="threshold"):
        class_thresholds(torch.tensor([0]), torch.tensor([0.9]), num_classes=3, threshold=1.5)


# ----------------------------------------------------------------------------- select_dynamic

# alpha = 0.5 combined logits z = (z_T + z_S) / 2 are chosen as
#   [5,0,0] [4,0,0] [0,4,0] [0,2,0] [0,0,1] [1,0,0]
# so c = e^a / (e^a + 2): 0.98670, 0.96466, 0.96466, 0.78699, 0.57612, 0.57612 and
# yhat = [0, 0, 1, 1, 2, 0]. Confident (c > 0.95): rows 0, 1 (class 0), row 2 (class 1)
# -> n = [2, 1, 0], beta = [1, 0.5, 0], tau_k = [0.95, 0.31667, 0].
# Selected: row0 .987>.95, row1 .965>.95, row2 .965>.317, row3 .787>.317, row4 .576>0, row5 .576<.95.
STUDENT = torch.tensor([[1., 0., 2.], [0., 2., 0.], [0., 0., 0.], [2., 0., 2.], [0., 2., 0.], [0., 0., 4.]])
TEACHER = torch.tensor([[9., 0., -2.], [8., -2., 0.], [0., 8., 0.], [-2., 4., -2.], [0., -2., 2.], [2., 0., -4.]])


def test_select_dynamic_golden_6x3():
    res = select_dynamic(TEACHER, STUDENT, alpha=0.5, threshold=0.95)
    assert res.mask.tolist() == [True, True, True, True, True, False]
    assert res.labels.tolist() == [0, 0, 1, 1, 2, 0]
    e = math.exp
    expected_c = [e(5) / (e(5) + 2), e(4) / (e(4) + 2), e(4) / (e(4) + 2), e(2) / (e(2) + 2),
                  e(1) / (e(1) + 2), e(1) / (e(1) + 2)]
    assert res.confidences.tolist() == pytest.approx(expected_c, abs=1e-6)
    assert res.confidences[0].item() == pytest.approx(0.986703291042268, abs=1e-6)
    assert res.counts.tolist() == [2, 1, 0]
    assert res.thresholds.tolist() == pytest.approx([0.95, 0.31666666666666665, 0.0], abs=1e-6)
    assert res.selected_per_class.tolist() == [2, 2, 1]
    assert res.fallback_used is False
    assert res.dominant_class == 0  # 2 of 3 confident samples > 0.5
    assert res.num_selected == 5


def test_select_dynamic_floor_guards_empty_class():
    # with floor 0.6 class 2 (tau_k 0 -> 0.6) loses row 4 (c = 0.576)
    res = select_dynamic(TEACHER, STUDENT, alpha=0.5, threshold=0.95, threshold_floor=0.6)
    assert res.mask.tolist() == [True, True, True, True, False, False]
    assert res.dominant_class == 0
    res = select_dynamic(TEACHER, STUDENT, alpha=0.5, dominance_fraction=0.7)
    assert res.dominant_class is None  # 2/3 < 0.7


def test_select_dynamic_alpha_one_uses_teacher_only():
    # teacher rows: [9,0,-2] c~1 cls0; [8,-2,0] cls0; [0,8,0] cls1; [-2,4,-2] cls1 c=e^4/(e^4+2e^-2)
    res = select_dynamic(TEACHER, None, alpha=1.0)
    assert res.labels.tolist() == [0, 0, 1, 1, 2, 0]
    c3 = math.exp(4) / (math.exp(4) + 2 * math.exp(-2))  # 0.99507 > 0.95: counted
    assert res.confidences[3].item() == pytest.approx(c3, abs=1e-6)
    assert res.counts.tolist() == [2, 2, 0]
    with pytest.raises(ValueError, match="alpha == 1"):
        select_dynamic(TEACHER, None, alpha=0.5)


def test_select_dynamic_max_class_share():
    # two classes, teacher only; c = sigmoid(a) for logits [a, 0] / [0, a]
    # rows: cls0 a=4, cls1 a=4, cls0 a=6, cls0 a=3.5, cls1 a=3.2, cls0 a=5; all c > 0.95
    # n = [4, 2] -> tau_k = [0.95, 0.3167]: all 6 selected.
    logits = torch.tensor([[4., 0.], [0., 4.], [6., 0.], [3.5, 0.], [0., 3.2], [5., 0.]])
    res = select_dynamic(logits, None, alpha=1.0)
    assert res.mask.all() and res.counts.tolist() == [4, 2]
    # cap = floor(0.5 * 6) = 3: class 0 keeps a = 6, 5, 4 (rows 2, 5, 0), drops row 3
    res = select_dynamic(logits, None, alpha=1.0, max_class_share=0.5)
    assert res.mask.tolist() == [True, True, True, False, True, True]
    assert res.selected_per_class.tolist() == [3, 2]
    assert res.counts.tolist() == [4, 2]  # n_k are pre-cap diagnostics
    # cap = floor(0.34 * 6) = 2: class 0 keeps rows 2, 5; class 1 keeps both
    res = select_dynamic(logits, None, alpha=1.0, max_class_share=0.34)
    assert res.mask.tolist() == [False, True, True, False, True, True]
    with pytest.raises(ValueError, match="max_class_share"):
        select_dynamic(logits, None, alpha=1.0, max_class_share=0.0)


def test_select_dynamic_fallback_on_empty():
    # c = e^1/(e+2)=.576, e^2/(e^2+2)=.787, e^.5/(e^.5+2)=.452: no c > .95 -> tau_k = .95 -> empty
    logits = torch.tensor([[1., 0., 0.], [2., 0., 0.], [0., 0., 0.5]])
    res = select_dynamic(logits, None, alpha=1.0)
    assert res.fallback_used is True
    assert res.mask.tolist() == [False, True, False]
    res = select_dynamic(logits, None, alpha=1.0, min_selected=2)
    assert res.mask.tolist() == [True, True, False]
    assert res.selected_per_class.tolist() == [2, 0, 0]
    assert res.dominant_class is None  # no confident sample at all
    res = select_dynamic(logits, None, alpha=1.0, min_selected=10)
    assert res.mask.all()


def test_select_dynamic_empty_pool():
    res = select_dynamic(torch.zeros(0, 3), torch.zeros(0, 3), alpha=0.3)
    assert res.mask.shape == (0,) and res.fallback_used is False
    assert res.counts.tolist() == [0, 0, 0]
    assert res.thresholds.tolist() == pytest.approx([0.95] * 3)
    assert res.selected_per_class.tolist() == [0, 0, 0]
    assert res.dominant_class is None


def test_select_dynamic_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        select_dynamic(TEACHER, STUDENT[:, :2], alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        select_dynamic(TEACHER, STUDENT, alpha=1.5)
    bad = STUDENT.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        select_dynamic(TEACHER, bad, alpha=0.5)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        select_dynamic(TEACHER[0], None, alpha=1.0)


def test_select_dynamic_is_detached():
    student = STUDENT.clone().requires_grad_(True)
    res = select_dynamic(TEACHER, student, alpha=0.5)
    assert not res.confidences.requires_grad


# ----------------------------------------------------------------------------- baseline rule


def test_select_by_teacher_confidence_golden():
    # c = sigmoid(a): [2,0] .8808, [1,0] .7311, [0,3] .9526, [.5,0] .6225, [0,1] .7311
    logits = torch.tensor([[2., 0.], [1., 0.], [0., 3.], [0.5, 0.], [0., 1.]])
    res = select_by_teacher_confidence(logits, threshold=0.7)
    assert res.mask.tolist() == [True, True, True, False, True]
    assert res.confidences.tolist() == pytest.approx(
        [0.8807970779778823, 0.7310585786300049, 0.9525741268224334, 0.6224593312018546,
         0.7310585786300049], abs=1e-6)
    assert res.counts.tolist() == [2, 2]
    assert res.thresholds.tolist() == pytest.approx([0.7, 0.7])
    assert res.dominant_class is None  # 2/4 is not > 0.5
    # cap 1 per class: class 0 keeps row 0 (.88), class 1 keeps row 2 (.95)
    res = select_by_teacher_confidence(logits, threshold=0.7, per_class_cap=1)
    assert res.mask.tolist() == [True, False, True, False, False]
    assert res.selected_per_class.tolist() == [1, 1]


def test_select_by_teacher_confidence_is_non_strict_and_falls_back():
    logits = torch.zeros(2, 2)  # c = 1/2 exactly, argmax tie -> class 0
    res = select_by_teacher_confidence(logits, threshold=0.5)
    assert res.mask.tolist() == [True, True] and res.fallback_used is False
    assert res.counts.tolist() == [2, 0] and res.dominant_class == 0
    res = select_by_teacher_confidence(logits, threshold=0.6)
    assert res.fallback_used is True and res.mask.tolist() == [True, False]
    with pytest.raises(ValueError, match="per_class_cap"):
        select_by_teacher_confidence(logits, threshold=0.5, per_class_cap=0)


def test_select_dynamic_threshold_is_strict():
    # c = 1/2 exactly; threshold = 0.5: not confident (n = 0 -> tau_k = 0.5) and 0.5 > 0.5 fails -> fallback
    res = select_dynamic(torch.zeros(2, 2), None, alpha=1.0, threshold=0.5)
    assert res.thresholds.tolist() == [0.5, 0.5]
    assert res.fallback_used is True and res.mask.tolist() == [True, False]
