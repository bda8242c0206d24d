"""Golden values for the BatchNorm in-domain scores (kd3/methods/ood.py), worked out by hand.

Input x: 2 samples, 2 channels, 1×2 pixels.
  sample 0: channel 0 = [1, 3] (μ 2, σ² 1), channel 1 = [-1, -1] (μ -1, σ² 0)
  sample 1: channel 0 = [5, 5] (μ 5, σ² 0), channel 1 = [1, -3]  (μ -1, σ² 4)
Layer A: running mean [1, -1], running var [4, 1], ε = 0 → sqrt(v + ε) = [2, 1].
  z: sample 0 = [(2-1)/2, 0] = [0.5, 0];  sample 1 = [(5-1)/2, 0] = [2, 0]
  r = (σ² - v)/v: sample 0 = [(1-4)/4, (0-1)/1] = [-0.75, -1];  sample 1 = [-1, 3]
Layer B follows A (γ 1, β 0), so its input is A's output (x - m)/sqrt(v):
  sample 0: channel 0 = [0, 1] (μ 0.5), channel 1 = [0, 0] (μ 0)
  sample 1: channel 0 = [2, 2] (μ 2),   channel 1 = [2, -2] (μ 0)
  B: running mean [1.5, 1], running var [0.25, 4], ε = 0 → sqrt = [0.5, 2]
  z: sample 0 = [(0.5-1.5)/0.5, (0-1)/2] = [-2, -0.5];  sample 1 = [(2-1.5)/0.5, -0.5] = [1, -0.5]
"""

import math

import pytest
import torch
from torch import nn

from kd3.errors import Kd3Error
from kd3.methods.ood import (NoBatchNormError, batchnorm_layers, bn_scores, bn_scores_or_none, combine_layers, energy,
                             max_softmax)

X = torch.tensor([[[[1.0, 3.0]], [[-1.0, -1.0]]],
                  [[[5.0, 5.0]], [[1.0, -3.0]]]])


def _bn(mean, var, eps=0.0):
    bn = nn.BatchNorm2d(len(mean), eps=eps)
    bn.running_mean.copy_(torch.tensor(mean))
    bn.running_var.copy_(torch.tensor(var))
    return bn


def layer_a(eps=0.0, var=(4.0, 1.0)):
    return _bn([1.0, -1.0], list(var), eps)


def two_layers():
    # an in-place ReLU after B must not change what B's hook saw
    return nn.Sequential(layer_a(), _bn([1.5, 1.0], [0.25, 4.0]), nn.ReLU(inplace=True))


def test_mean_term_squared_and_absolute():
    squared = bn_scores(nn.Sequential(layer_a()), X)
    # mean over channels of z²: (0.25 + 0)/2, (4 + 0)/2
    assert squared.score.tolist() == pytest.approx([0.125, 2.0])
    assert squared.per_layer.shape == (2, 1) and squared.layers == ["0"]
    absolute = bn_scores(nn.Sequential(layer_a()), X, distance="absolute")
    # mean of |z|: (0.5 + 0)/2, (2 + 0)/2
    assert absolute.score.tolist() == pytest.approx([0.25, 1.0])


def test_variance_term():
    # squared: r² means (0.5625 + 1)/2 = 0.78125 and (1 + 9)/2 = 5; λ = 0.5
    scores = bn_scores(nn.Sequential(layer_a()), X, variance_weight=0.5)
    assert scores.score.tolist() == pytest.approx([0.125 + 0.5 * 0.78125, 2.0 + 0.5 * 5.0])
    # absolute: |r| means (0.75 + 1)/2 = 0.875 and (1 + 3)/2 = 2; λ = 1
    scores = bn_scores(nn.Sequential(layer_a()), X, distance="absolute", variance_weight=1.0)
    assert scores.score.tolist() == pytest.approx([0.25 + 0.875, 1.0 + 2.0])


def test_eps_enters_both_terms():
    # running var [3, 0] with ε = 1: sqrt(v + ε) = [2, 1] again (same z); r = (σ² - v)/(v + ε):
    # sample 0 = [(1-3)/4, (0-0)/1] = [-0.5, 0] → r² mean 0.125; sample 1 = [(0-3)/4, (4-0)/1] = [-0.75, 4]
    # → r² mean (0.5625 + 16)/2 = 8.28125
    scores = bn_scores(nn.Sequential(layer_a(eps=1.0, var=(3.0, 0.0))), X, variance_weight=1.0)
    assert scores.score.tolist() == pytest.approx([0.125 + 0.125, 2.0 + 8.28125])


def test_layers_are_averaged_or_weighted():
    scores = bn_scores(two_layers(), X)
    # B: z² means (4 + 0.25)/2 = 2.125 and (1 + 0.25)/2 = 0.625
    assert scores.layers == ["0", "1"]
    assert scores.per_layer.tolist() == [pytest.approx([0.125, 2.125]), pytest.approx([2.0, 0.625])]
    assert scores.score.tolist() == pytest.approx([(0.125 + 2.125) / 2, (2.0 + 0.625) / 2])
    weighted = bn_scores(two_layers(), X, layer_weights=[3.0, 1.0])
    assert weighted.score.tolist() == pytest.approx([(3 * 0.125 + 2.125) / 4, (3 * 2.0 + 0.625) / 4])
    late = bn_scores(two_layers(), X, layers=["1"], distance="absolute")
    # B: |z| means (2 + 0.5)/2 = 1.25 and (1 + 0.5)/2 = 0.75
    assert late.layers == ["1"] and late.score.tolist() == pytest.approx([1.25, 0.75])


def test_combine_layers_checks_weights():
    per_layer = torch.tensor([[1.0, 3.0]])
    assert combine_layers(per_layer).tolist() == [2.0]
    assert combine_layers(per_layer, [0.0, 2.0]).tolist() == [3.0]
    with pytest.raises(ValueError, match="one per layer"):
        combine_layers(per_layer, [1.0])
    with pytest.raises(ValueError, match="not all 0"):
        combine_layers(per_layer, [0.0, 0.0])


def test_runs_in_eval_mode_and_restores_flags():
    model = two_layers().train()
    before = [b.running_mean.clone() for _, b in batchnorm_layers(model)]
    scores = bn_scores(model, X)
    assert scores.score.tolist() == pytest.approx([1.125, 1.3125])  # as in eval mode, see above
    assert model.training and all(m.training for m in model.modules())
    for (_, bn), mean in zip(batchnorm_layers(model), before):
        assert torch.equal(bn.running_mean, mean) and int(bn.num_batches_tracked) == 0
    assert not bn_scores(two_layers(), X).per_layer.requires_grad


def test_no_batchnorm_raises_or_returns_none():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(NoBatchNormError, match="energy or max-softmax"):
        bn_scores(model, X)
    assert bn_scores_or_none(model, X) is None
    assert bn_scores_or_none(nn.Sequential(layer_a()), X).score.tolist() == pytest.approx([0.125, 2.0])


def test_unknown_or_unused_layer_and_bad_distance():
    with pytest.raises(Kd3Error, match="not BatchNorm2d"):
        bn_scores(two_layers(), X, layers=["2"])
    with pytest.raises(Kd3Error, match="never called"):
        bn_scores(two_layers(), X, forward=lambda m, x: m[0](x))
    with pytest.raises(ValueError, match="squared"):
        bn_scores(two_layers(), X, distance="cubed")


def test_max_softmax_and_energy():
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
    # softmax row 0 = (2, 1, 1)/4, row 1 = 1/3 each
    assert max_softmax(logits).tolist() == pytest.approx([0.5, 1 / 3])
    # −logsumexp: −ln(2 + 1 + 1), −ln 3; T = 2: −2·ln(√2 + 2), −2·ln 3
    assert energy(logits).tolist() == pytest.approx([-math.log(4.0), -math.log(3.0)])
    assert energy(logits, 2.0).tolist() == pytest.approx([-2 * math.log(math.sqrt(2) + 2), -2 * math.log(3.0)])
