"""KD³ loss terms (METHODS.md §1c, §1d). Golden values are worked out by hand / with `math`."""

import math

import pytest
import torch

from kd3.methods.kd3_losses import feature_weights, nt_xent, weighted_feature_alignment

# distances ||z_S - z_T||: sample 0 -> ||(3, 4)|| = 5, sample 1 -> 0
Z_S = torch.tensor([[3., 4.], [0., 0.]])
Z_T = torch.zeros(2, 2)


def test_feature_weights_sigmoid_golden():
    w = feature_weights(Z_S, Z_T)
    # sigmoid(5) = 1/(1+e^-5), sigmoid(0) = 0.5
    assert w.tolist() == pytest.approx([0.9933071490757153, 0.5], abs=1e-6)
    w = feature_weights(Z_S, Z_T, temperature=5.0)
    assert w.tolist() == pytest.approx([0.7310585786300049, 0.5], abs=1e-6)  # sigmoid(5/5)


def test_feature_weights_batch_normalised_golden():
    w = feature_weights(Z_S, Z_T, mode="batch_normalised")
    # mean = (0.993307 + 0.5)/2 = 0.746654 -> [0.993307/0.746654, 0.5/0.746654]
    assert w.tolist() == pytest.approx([1.330345401065714, 0.6696545989342859], abs=1e-6)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_feature_weights_detached_and_validated():
    z_s = Z_S.clone().requires_grad_(True)
    assert not feature_weights(z_s, Z_T).requires_grad
    with pytest.raises(ValueError, match="'softmax'.*sigmoid, batch_normalised"):
        feature_weights(Z_S, Z_T, mode="softmax")
    with pytest.raises(ValueError, match="temperature"):
        feature_weights(Z_S, Z_T, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        feature_weights(Z_S, torch.zeros(2, 3))


def test_weighted_feature_alignment_golden_and_gradient():
    student = torch.tensor([[[[1., 2.], [3., 4.]]], [[[0., 0.], [0., 0.]]]], requires_grad=True)
    teacher = torch.tensor([[[[0., 0.], [0., 0.]]], [[[1., 1.], [1., 1.]]]])
    weights = torch.tensor([0.5, 2.0])
    loss = weighted_feature_alignment(student, teacher, weights)
    # m_0 = (1+4+9+16)/4 = 7.5, m_1 = 1 -> L = (0.5*7.5 + 2*1)/2 = 2.875
    assert loss.item() == pytest.approx(2.875, abs=1e-6)
    loss.backward()
    # dL/dP_i = (1/B) * w_i * 2 (P_i - T_i) / n_elements: sample 0 -> 0.125 * P, sample 1 -> -0.5
    assert student.grad[0].flatten().tolist() == pytest.approx([0.125, 0.25, 0.375, 0.5], abs=1e-6)
    assert student.grad[1].flatten().tolist() == pytest.approx([-0.5] * 4, abs=1e-6)


def test_weighted_feature_alignment_uniform_weights_is_mse():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    loss = weighted_feature_alignment(a, b, torch.ones(3))
    assert loss.item() == pytest.approx(((a - b) ** 2).mean().item(), abs=1e-6)


def test_weighted_feature_alignment_shape_errors():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 2, 2\)"):
        weighted_feature_alignment(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        weighted_feature_alignment(torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2), torch.ones(3))


E1, E2 = [1., 0.], [0., 1.]


def test_nt_xent_identical_views():
    # every anchor: positive cos 1, two negatives cos 0 -> log(1 + 2 e^{-1/t})
    z = torch.tensor([E1, E2])
    assert nt_xent(z, z.clone(), temperature=0.3).item() == pytest.approx(0.0689176562398935, abs=1e-5)
    # normalised inside: scaling a view does not matter
    assert nt_xent(3 * z, 0.5 * z, temperature=0.3).item() == pytest.approx(0.0689176562398935, abs=1e-5)


def test_nt_xent_swapped_and_opposite_views():
    z1 = torch.tensor([E1, E2])
    # swapped: positive cos 0, negatives cos 0 and 1 -> log(2 + e^{1/t})
    assert nt_xent(z1, torch.tensor([E2, E1]), 0.3).item() == pytest.approx(3.402250989573227, abs=1e-5)
    # opposite: positive cos -1, negatives cos 0, 0 -> log(1 + 2 e^{1/t})
    assert nt_xent(z1, -z1, 0.3).item() == pytest.approx(4.0441602980551, abs=1e-5)


def test_nt_xent_asymmetric_golden():
    # a0=[1,0] a1=[0,1] b0=[1,0] b1=[1,0], t = 0.5 (s = 1/t = 2):
    # a0, b0: log(2 + e^-2); a1: log 3; b1: log(1 + 2 e^2); mean over 4 anchors
    expected = (2 * math.log(2 + math.exp(-2)) + math.log(3) + math.log(1 + 2 * math.exp(2))) / 4
    assert expected == pytest.approx(1.3436208289266625, abs=1e-12)
    z1, z2 = torch.tensor([E1, E2]), torch.tensor([E1, E1])
    assert nt_xent(z1, z2, temperature=0.5).item() == pytest.approx(1.3436208289266625, abs=1e-5)


def test_nt_xent_single_pair_gradient_and_errors():
    z1 = torch.randn(1, 4)
    assert nt_xent(z1, torch.randn(1, 4)).item() == pytest.approx(0.0, abs=1e-6)  # only the positive
    a = torch.randn(4, 8, requires_grad=True)
    nt_xent(a, torch.randn(4, 8)).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.ones(2, 3), torch.ones(2, 3), temperature=0)
