"""ND loss and teacher class means against hand-computed values (METHODS.md §4)."""

import pytest
import torch
from torch import nn

from kd3.methods.nd import NDEmbeddingHead, nd_loss, teacher_class_means


def test_teacher_class_means_by_hand():
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    means, counts = teacher_class_means(feats, torch.tensor([0, 0, 2]), 3)
    # class 0: ((1+3)/2, (2+4)/2) = (2, 3); class 1: empty → 0; class 2: (5, 6)
    assert means.tolist() == [[2.0, 3.0], [0.0, 0.0], [5.0, 6.0]]
    assert counts.tolist() == [2, 0, 1]
    assert counts.dtype == torch.int64


# c_0 = (3, 4) → direction (0.6, 0.8); c_1 = (0, 2) → direction (0, 1).
MEANS = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
F_S = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])
F_T = torch.tensor([[0.0, 10.0], [0.6, 0.8], [1.0, 0.0]])
Y = torch.tensor([0, 1, 1])


def test_nd_loss_three_samples_by_hand():
    # i=1: ⟨(3,4),(.6,.8)⟩ = 5, max(5, 10) = 10 → 1 − 0.5 = 0.5   (teacher norm dominates)
    # i=2: ⟨(1,0),(0,1)⟩ = 0, max(1, 1) = 1 → 1 − 0 = 1
    # i=3: ⟨(0,−2),(0,1)⟩ = −2, max(2, 1) = 2 → 1 + 1 = 2      (student norm dominates)
    # L = (0.5 + 1 + 2)/3 = 7/6
    loss = nd_loss(F_S, F_T, Y, MEANS)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(7 / 6, rel=1e-6)


def test_nd_loss_gradient_reaches_student_only():
    f_s = F_S.clone().requires_grad_(True)
    f_t = F_T.clone().requires_grad_(True)
    nd_loss(f_s, f_t, Y, MEANS).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None  # teacher feature is a constant
    # i=1: denominator is ‖f_t‖ = 10 (constant) → ∂L/∂f_s,1 = −(1/3)·(0.6, 0.8)/10
    assert f_s.grad[0].tolist() == pytest.approx([-0.02, -0.08 / 3], rel=1e-5)


def test_nd_loss_empty_class_mean_names_class():
    means = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"\[1\]"):
        nd_loss(F_S, F_T, Y, means)


def test_nd_loss_bad_shapes():
    with pytest.raises(ValueError):
        nd_loss(F_S, F_T[:2], Y, MEANS)
    with pytest.raises(ValueError):
        nd_loss(F_S, F_T, torch.tensor([0, 1, 2]), MEANS)


def test_nd_embedding_head():
    head = NDEmbeddingHead(8, 5, dropout=0.1)
    assert [type(m) for m in head.children()] == [nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert head(torch.randn(4, 8)).shape == (4, 5)
    with pytest.raises(ValueError):
        NDEmbeddingHead(8, 5, dropout=1.0)
