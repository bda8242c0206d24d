"""In-domain scores from a model's BatchNorm statistics (data-free; METHODS.md §6). Pure torch, no I/O.

A teacher's BatchNorm running mean / variance summarise the activations its private training data
produced. How far one sample's activations lie from them says how much the sample looks like that
data, without any of it. For a sample and a ``BatchNorm2d`` layer l with running mean m, running
variance v and ε, whose *input* is a ∈ R^{C×H×W}:

    μ_c = mean_{h,w} a_c            σ²_c = var_{h,w} a_c   (biased, over the H·W positions)
    z_c = (μ_c − m_c) / sqrt(v_c + ε)        r_c = (σ²_c − v_c) / (v_c + ε)
    s_l = mean_c d(z_c) + λ · mean_c d(r_c)  with d(t) = t² ("squared") or |t| ("absolute")
    score = Σ_l w_l s_l / Σ_l w_l             (w_l = 1 unless ``layer_weights`` says otherwise)

Lower = more in-domain. λ (``variance_weight``) is 0 by default: the mean term alone. The model
runs in eval mode (running statistics untouched) under ``torch.no_grad``; its train/eval flags are
restored afterwards. A layer the forward calls more than once gets the mean of its calls.

Fallback: a model without ``BatchNorm2d`` layers (with running statistics) carries no summary of
its training data; :func:`bn_scores` raises :class:`NoBatchNormError` and :func:`bn_scores_or_none`
returns None. Use :func:`energy` (or :func:`max_softmax`) of the logits instead, knowing that on
web pools confidence can be inverted (AUROC for "is a digit" below 0.5 on the demo and hard pools,
against about 0.93 for the BN mean term; ``benchmarks/bn_signal_study.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
from torch import nn

from kd3.errors import Kd3Error

Distance = Literal["squared", "absolute"]


class NoBatchNormError(Kd3Error):
    """The model has no BatchNorm2d layer with running statistics: use energy or max-softmax instead."""


@dataclass
class BNScores:
    """Per-sample scores: ``score`` [N] (combined; lower = more in-domain), ``per_layer`` [N, L]
    (s_l of every layer in ``layers``, in the order of ``model.named_modules()``)."""

    score: torch.Tensor
    per_layer: torch.Tensor
    layers: list[str]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every ``BatchNorm2d`` of ``model`` that tracks running statistics, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None]


def _distance(t: torch.Tensor, distance: Distance) -> torch.Tensor:
    if distance == "squared":
        return t * t
    if distance == "absolute":
        return t.abs()
    raise ValueError(f"distance must be 'squared' or 'absolute', got {distance!r}")


def layer_score(bn_input: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                distance: Distance = "squared", variance_weight: float = 0.0) -> torch.Tensor:
    """s_l [N] of one layer from its input [N, C, H, W] and statistics [C] (formulas in the module doc)."""
    a = bn_input.float()
    mean = running_mean.float().view(1, -1)
    var = running_var.float().view(1, -1)
    mu = a.mean(dim=(2, 3))
    z = (mu - mean) / torch.sqrt(var + eps)
    score = _distance(z, distance).mean(dim=1)
    if variance_weight:
        sigma2 = a.var(dim=(2, 3), unbiased=False)
        r = (sigma2 - var) / (var + eps)
        score = score + variance_weight * _distance(r, distance).mean(dim=1)
    return score


def combine_layers(per_layer: torch.Tensor, layer_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Weighted mean over layers: [N, L] → [N]; ``layer_weights`` (L values ≥ 0, not all 0) or uniform."""
    if layer_weights is None:
        return per_layer.mean(dim=1)
    w = torch.as_tensor(list(layer_weights), dtype=per_layer.dtype)
    if w.shape != (per_layer.shape[1],):
        raise ValueError(f"layer_weights needs {per_layer.shape[1]} values (one per layer), got {len(w)}")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"layer_weights must be ≥ 0 and not all 0, got {w.tolist()}")
    return per_layer @ (w / w.sum())


@torch.no_grad()
def bn_scores(model: nn.Module, x: torch.Tensor, distance: Distance = "squared", variance_weight: float = 0.0,
              layer_weights: Optional[Sequence[float]] = None, layers: Optional[Sequence[str]] = None,
              forward: Optional[Callable[[nn.Module, torch.Tensor], object]] = None) -> BNScores:
    """BatchNorm in-domain scores of a (normalised) batch ``x``; lower = more in-domain.

    ``layers``: names of the BatchNorm2d layers to use (default: all of :func:`batchnorm_layers`);
    ``layer_weights``: one weight per used layer for the combination; ``forward(model, x)`` runs the
    model (default ``model(x)``). Raises :class:`NoBatchNormError` when there is no such layer and
    :class:`~kd3.errors.Kd3Error` when a requested layer is unknown or the forward never calls it.
    """
    _distance(torch.zeros(1), distance)  # reject an unknown distance before running anything
    available = batchnorm_layers(model)
    if not available:
        raise NoBatchNormError(f"{type(model).__name__} has no BatchNorm2d layer with running statistics: "
                               "no BN in-domain score; use energy or max-softmax of the logits instead")
    if layers is not None:
        by_name = dict(available)
        unknown = [name for name in layers if name not in by_name]
        if unknown:
            raise Kd3Error(f"not BatchNorm2d layers with running statistics: {unknown} "
                           f"(available: {[name for name, _ in available]})")
        available = [(name, by_name[name]) for name in layers]
    calls: list[list[torch.Tensor]] = [[] for _ in available]

    def hook(index: int, module: nn.BatchNorm2d):
        def record(_module, inputs, _output):
            calls[index].append(layer_score(inputs[0].float(), module.running_mean, module.running_var, module.eps,
                                            distance, variance_weight).cpu())
        return record

    flags = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook(i, m)) for i, (_, m) in enumerate(available)]
    try:
        model.eval()
        (forward or (lambda mod, inp: mod(inp)))(model, x)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in flags.items():
            m.training = flag
    unused = [name for (name, _), got in zip(available, calls) if not got]
    if unused:
        raise Kd3Error(f"the forward pass never called BatchNorm layers {unused}; pass layers= without them")
    per_layer = torch.stack([torch.stack(got).mean(dim=0) for got in calls], dim=1)
    return BNScores(score=combine_layers(per_layer, layer_weights), per_layer=per_layer,
                    layers=[name for name, _ in available])


def bn_scores_or_none(model: nn.Module, x: torch.Tensor, **kwargs) -> Optional[BNScores]:
    """:func:`bn_scores`, or None for a model without BatchNorm2d (then fall back to :func:`energy`
    or :func:`max_softmax` of its logits)."""
    try:
        return bn_scores(model, x, **kwargs)
    except NoBatchNormError:
        return None


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability [N]; higher = more confident (read as more in-domain)."""
    return logits.float().softmax(dim=1).max(dim=1).values


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Energy −T·logsumexp(z / T) [N]; lower = more in-domain (Liu et al., 2020)."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=1)
