"""Golden values for the classic KD loss on a 2×3 logit tensor (worked out by hand)."""

import math

import pytest
import torch

from kd3.methods.kd import kd_loss

# Row 0: teacher logits (ln 2, 0, 0) → p_T = (1/2, 1/4, 1/4); student all-zero → p_S = 1/3 each.
# Row 1: teacher all-zero → p_T = p_S → KL = 0.
TEACHER = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
STUDENT = torch.zeros(2, 3)


def test_kd_loss_at_temperature_one():
    # KL row 0 = 1/2·ln(3/2) + 2·1/4·ln(3/4) = 1/2·ln(9/8); batch mean = 1/4·ln(9/8)
    assert kd_loss(STUDENT, TEACHER, temperature=1.0).item() == pytest.approx(0.25 * math.log(9 / 8), abs=1e-7)
    assert kd_loss(STUDENT, TEACHER, temperature=1.0).item() == pytest.approx(0.029445758914095864, abs=1e-7)


def test_kd_loss_temperature_two_scales_by_tau_squared():
    # τ = 2: teacher row 0 becomes (ln2/2, 0, 0) → p ∝ (√2, 1, 1); KL = Σ p ln(3p); loss = τ²·KL/2
    s = math.sqrt(2) + 2
    p = [math.sqrt(2) / s, 1 / s, 1 / s]
    expected = 4 * sum(x * math.log(3 * x) for x in p) / 2
    value = kd_loss(STUDENT, TEACHER, temperature=2.0).item()
    assert value == pytest.approx(expected, abs=1e-7)
    assert value == pytest.approx(0.02844118564578993, abs=1e-7)


def test_kd_loss_is_zero_when_student_matches_and_gradient_only_reaches_student():
    student = TEACHER.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    loss = kd_loss(student, teacher, temperature=4.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert teacher.grad is None


def test_kd_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(STUDENT, TEACHER, temperature=0.0)
