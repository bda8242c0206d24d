"""MixDistribution (METHODS.md §1d). Golden values are worked out by hand."""

import pytest
import torch

from kd3.methods.mixdistribution import mix_distribution


def _stats(x, eps):
    """Per-sample per-channel mean and sqrt(unbiased var + eps), computed from the definition."""
    n = x.shape[2] * x.shape[3]
    mu = x.sum(dim=(2, 3), keepdim=True) / n
    var = ((x - mu) ** 2).sum(dim=(2, 3), keepdim=True) / (n - 1)
    return mu, var, (var + eps).sqrt()


def test_lambda_one_gives_x_back():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6) * 3 + 1
    out = mix_distribution(x, lam=1.0, perm=torch.tensor([3, 2, 1, 0]))
    assert torch.allclose(out, x, atol=1e-5)
    # with lam = 1 a random perm must not matter either
    assert torch.allclose(mix_distribution(x, lam=1.0), x, atol=1e-5)


def test_hand_computed_two_samples():
    # x0 = [0, 2]: mu 1, sigma sqrt(2); x1 = [10, 14]: mu 12, sigma 2 sqrt(2) (unbiased, eps 0)
    # perm [1, 0], lam [0.5, 0.25]:
    # 0: mu_mix = .5*1 + .5*12 = 6.5, sigma_mix = 1.5 sqrt2, normed = [-1/sqrt2, 1/sqrt2] -> [5, 8]
    # 1: mu_mix = .25*12 + .75*1 = 3.75, sigma_mix = 1.25 sqrt2 -> [2.5, 5]
    x = torch.tensor([[[[0., 2.]]], [[[10., 14.]]]])
    out = mix_distribution(x, lam=torch.tensor([0.5, 0.25]), perm=torch.tensor([1, 0]), eps=0.0)
    assert out.flatten().tolist() == pytest.approx([5.0, 8.0, 2.5, 5.0], abs=1e-5)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5])
def test_mixed_statistics(eps):
    torch.manual_seed(1)
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64) * torch.tensor([1., 4., 0.5]).view(3, 1, 1, 1).double() + 2
    lam = torch.tensor([0.3, 0.8, 0.5], dtype=torch.float64).view(3, 1, 1, 1)
    perm = torch.tensor([2, 0, 1])
    out = mix_distribution(x, lam=lam.flatten(), perm=perm, eps=eps)
    mu, var, sigma = _stats(x, eps)
    mu_out, var_out, _ = _stats(out, 0.0)
    assert torch.allclose(mu_out, lam * mu + (1 - lam) * mu[perm], atol=1e-10)
    sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
    # x~ = sigma_mix (x - mu)/sigma + mu_mix, so its std is sigma_mix * sqrt(var) / sqrt(var + eps)
    assert torch.allclose(var_out.sqrt(), sigma_mix * var.sqrt() / sigma, atol=1e-10)
    if eps == 0.0:
        assert torch.allclose(var_out.sqrt(), sigma_mix, atol=1e-10)


def test_identity_perm_and_probability_zero():
    torch.manual_seed(2)
    x = torch.randn(3, 2, 4, 4)
    # mu[perm] = mu, sigma[perm] = sigma: any lambda gives x back
    assert torch.allclose(mix_distribution(x, lam=torch.tensor([0.1, 0.5, 0.9]), perm=torch.arange(3)), x, atol=1e-5)
    assert mix_distribution(x, p=0.0) is x


def test_random_draws_reproducible_with_generator():
    torch.manual_seed(3)
    x = torch.randn(8, 3, 4, 4)
    state = torch.get_rng_state()
    a = mix_distribution(x, generator=torch.Generator().manual_seed(7))
    b = mix_distribution(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert not torch.allclose(a, x, atol=1e-3)
    # p = 0.5: over many seeds both outcomes occur
    outcomes = {torch.equal(mix_distribution(x, p=0.5, generator=torch.Generator().manual_seed(s)), x)
                for s in range(20)}
    assert outcomes == {True, False}


def test_gradient_flows_to_input():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    mix_distribution(x, lam=torch.tensor([0.2, 0.7]), perm=torch.tensor([1, 0])).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_invalid_inputs():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        mix_distribution(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="H\\*W"):
        mix_distribution(torch.randn(2, 3, 1, 1))
    with pytest.raises(ValueError, match="permutation"):
        mix_distribution(x, perm=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="lam"):
        mix_distribution(x, lam=torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="lam"):
        mix_distribution(x, lam=1.5)
    with pytest.raises(ValueError, match="p must"):
        mix_distribution(x, p=2.0)
