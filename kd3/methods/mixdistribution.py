"""MixDistribution: MixStyle-like statistic mixing of an input batch (METHODS.md §1d). Pure torch."""

from __future__ import annotations

import torch


def mix_distribution(x: torch.Tensor, lam: float | torch.Tensor | None = None, perm: torch.Tensor | None = None,
                     beta_alpha: float = 0.1, eps: float = 1e-6, p: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """x̃ = σ_mix·(x − μ)/σ + μ_mix (METHODS.md §1d). x [B, C, H, W] → x̃ of the same shape.

    μ, σ: per-sample, per-channel mean and sqrt(var + eps) over H×W, detached (as in MixStyle, the
    variance is the unbiased estimate, so H·W ≥ 2 is required). μ_mix = λμ + (1−λ)μ[perm],
    σ_mix = λσ + (1−λ)σ[perm]; λ ~ Beta(beta_alpha, beta_alpha) per sample, shape [B, 1, 1, 1],
    unless ``lam`` is given (a number, or a tensor of B values); ``perm`` is a random permutation
    of the batch unless given. With probability ``p`` the whole batch is mixed, otherwise ``x`` is
    returned unchanged (the same tensor). λ = 1 returns x up to rounding.

    ``generator`` (a CPU torch.Generator) makes every draw reproducible; the draws happen on the
    CPU and the global RNG is left untouched when it is given.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    batch, _, height, width = x.shape
    if height * width < 2:
        raise ValueError(f"mix_distribution needs H*W >= 2 for a per-channel std, got {height}x{width}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    if not beta_alpha > 0:
        raise ValueError(f"beta_alpha must be > 0, got {beta_alpha!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    if batch == 0 or p == 0.0:
        return x
    # draw only when 0 < p < 1, so p = 1 consumes no random number for the coin
    if p < 1.0 and float(torch.rand((), generator=generator)) >= p:
        return x

    if lam is None:
        lam = _sample_beta(batch, beta_alpha, generator)
    lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    if lam.numel() == 1:
        lam = lam.reshape(1).expand(batch)
    if lam.numel() != batch:
        raise ValueError(f"lam must be a number or hold B={batch} values, got shape {tuple(lam.shape)}")
    if not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ValueError("lam values must lie in [0, 1]")
    lam = lam.reshape(batch, 1, 1, 1)

    if perm is None:
        perm = torch.randperm(batch, generator=generator)
    perm = torch.as_tensor(perm).long()
    if perm.shape != (batch,) or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(batch)):
        raise ValueError(f"perm must be a permutation of range({batch}), got {perm.tolist()}")
    perm = perm.to(x.device)

    mu = x.mean(dim=(2, 3), keepdim=True).detach()
    sigma = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    normed = (x - mu) / sigma
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
    return normed * sigma_mix + mu_mix


def _sample_beta(batch: int, alpha: float, generator: torch.Generator | None) -> torch.Tensor:
    """λ ~ Beta(α, α), [batch] on the CPU; reproducible from ``generator`` when one is given."""
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    if generator is None:
        return beta.sample((batch,))
    # torch's Beta sampler has no generator argument: seed a forked CPU RNG from the generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return beta.sample((batch,))
