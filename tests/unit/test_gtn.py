"""Generic teacher (GTN): the student pool, the weight-sharing supernet, extraction, the joint loss."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kd3.methods.gtn import (GTNLoss, StudentPool, StudentSupernet, SubnetConfig, gtn_loss, recalibrate_bn,
                             soft_kl)
from kd3.models import build_model

POOL = StudentPool(families=("small_cnn", "cifar_resnet"), widths=(0.25, 0.5, 0.75, 1.0), depths=(1, 2),
                   small_cnn_widths=(8, 16, 32), resnet_widths=(8, 16, 32, 64))


def _supernet(seed: int = 0) -> StudentSupernet:
    torch.manual_seed(seed)
    return StudentSupernet(POOL, num_classes=10, in_channels=1)


def _extract(net: StudentSupernet, cfg: SubnetConfig) -> torch.nn.Module:
    arch, options = POOL.registry_model(cfg)
    model = build_model(arch, 10, 1, options)
    model.load_state_dict(net.extract_state(cfg, model.state_dict()))
    return model


def test_pool_members_and_sandwich_rule():
    members = POOL.members()
    assert len(members) == 2 * 4 * 2 and len(set(members)) == 16
    picks = POOL.sandwich(3, random.Random(0))
    assert picks[:4] == [SubnetConfig("small_cnn", 1.0, 2), SubnetConfig("small_cnn", 0.25, 1),
                         SubnetConfig("cifar_resnet", 1.0, 2), SubnetConfig("cifar_resnet", 0.25, 1)]
    assert len(picks) == 7 and all(p in members for p in picks[4:])
    assert POOL.registry_model(SubnetConfig("small_cnn", 0.5, 1)) == ("small_cnn", {"widths": [4, 8, 16],
                                                                                     "convs_per_stage": 1})
    assert POOL.registry_model(SubnetConfig("cifar_resnet", 0.75, 2)) == ("cifar_resnet", {
        "widths": [6, 12, 24, 48], "num_blocks": [2, 2, 2, 2]})
    with pytest.raises(ValueError, match="width multipliers"):
        StudentPool(families=("small_cnn",), widths=(1.5,), depths=(1,))


@pytest.mark.parametrize("cfg", POOL.members(), ids=lambda c: c.name)
def test_every_subnet_runs_and_extracts_to_the_same_function(cfg):
    net = _supernet()
    x = torch.randn(4, 1, 16, 16)
    logits = net(x, cfg)
    assert logits.shape == (4, 10)
    model = _extract(net, cfg).train()  # batch statistics, as the supernet normalises
    torch.testing.assert_close(model(x), logits, rtol=1e-5, atol=1e-5)


def test_extracted_weights_are_leading_slices_of_the_supernet():
    net = _supernet()
    cfg = SubnetConfig("small_cnn", 0.5, 2)
    state = _extract(net, cfg).state_dict()
    big = net.families["small_cnn"]
    assert state["features.0.weight"].shape == (4, 1, 3, 3)
    assert torch.equal(state["features.0.weight"], big.stages[0][0]["conv"].weight[:4, :1])
    assert torch.equal(state["features.3.weight"], big.stages[0][1]["conv"].weight[:4, :4])  # 2nd conv of stage 0
    assert torch.equal(state["features.7.weight"], big.stages[1][0]["conv"].weight[:8, :4])  # after the max-pool
    assert torch.equal(state["fc.weight"], big.fc.weight[:, :16])
    res = _extract(net, SubnetConfig("cifar_resnet", 0.25, 1)).state_dict()
    assert torch.equal(res["layer2.0.shortcut.0.weight"],
                       net.families["cifar_resnet"].layer2[0].shortcut[0].weight[:4, :2])
    assert not any(k.startswith("layer1.1.") for k in res)


def test_a_gradient_step_on_a_subnet_changes_the_shared_slice_only():
    net = _supernet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = SubnetConfig("small_cnn", 0.25, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(net(torch.randn(8, 1, 16, 16), cfg), torch.arange(8)).backward()
    opt.step()
    after = net.state_dict()
    w0 = "families.small_cnn.stages.0.0.conv.weight"
    assert not torch.equal(after[w0][:2, :1], before[w0][:2, :1])  # the sub-network's slice moved
    assert torch.equal(after[w0][2:], before[w0][2:])  # channels it does not use did not
    second = "families.small_cnn.stages.0.1.conv.weight"
    assert torch.equal(after[second], before[second])  # depth 1 never uses the second conv
    assert all(torch.equal(after[k], before[k]) for k in after if ".cifar_resnet." in k)
    # the larger sub-network sees the change: shared weights
    big = SubnetConfig("small_cnn", 1.0, 1)
    assert torch.equal(_extract(net, big).state_dict()["features.0.weight"][:2], after[w0][:2, :1])


def test_bn_recalibration_gives_the_data_statistics():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, {"widths": [4], "convs_per_stage": 1})
    x = torch.randn(16, 1, 8, 8) * 3 + 2
    seen = recalibrate_bn(model, [x[:8], x[8:]])
    assert seen == 16 and not model.training
    conv_out = model.features[0](x)
    torch.testing.assert_close(model.features[1].running_mean, conv_out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- the joint loss
def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_soft_kl_golden():
    # τ = 2: softmax([2, 0]/2) = softmax([1, 0]); softmax([0, 0]) = [0.5, 0.5]
    p = _softmax([1.0, 0.0])
    expected = _kl(p, [0.5, 0.5]) * 4
    value = soft_kl(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), 2.0)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.4438, abs=1e-4)  # 4·(0.7311·ln 1.4621 + 0.2689·ln 0.5379)


def test_gtn_loss_golden_and_gradient_split():
    teacher = torch.tensor([[2.0, 0.0]], requires_grad=True)
    s1 = torch.tensor([[0.0, 0.0]], requires_grad=True)
    s2 = torch.tensor([[0.0, 2.0]], requires_grad=True)
    y = torch.tensor([0])
    out = gtn_loss(teacher, [s1, s2], y, temperature=1.0, compat_weight=0.5, student_ce_weight=0.25)
    assert isinstance(out, GTNLoss)
    pt = _softmax([2.0, 0.0])
    ce_t = -math.log(pt[0])  # 0.1269
    kl1, kl2 = _kl(pt, [0.5, 0.5]), _kl(pt, _softmax([0.0, 2.0]))
    ce_s = -math.log(0.5) - math.log(_softmax([0.0, 2.0])[0])
    assert out.teacher_ce.item() == pytest.approx(ce_t, rel=1e-6)
    assert out.compat.item() == pytest.approx((kl1 + kl2) / 2, rel=1e-6)
    assert out.super_kd.item() == pytest.approx(kl1 + kl2, rel=1e-6)
    assert out.super_ce.item() == pytest.approx(ce_s, rel=1e-6)
    assert out.total.item() == pytest.approx(ce_t + 0.5 * (kl1 + kl2) / 2 + kl1 + kl2 + 0.25 * ce_s, rel=1e-6)
    # 0.1269 + 0.5·(0.3278 + 1.5232)/2 + (0.3278 + 1.5232) + 0.25·(0.6931 + 2.1269)
    assert out.total.item() == pytest.approx(3.1457, abs=1e-4)
    # the teacher's gradient comes from CE and the compatibility term only; the students' from KD and CE
    out.total.backward()
    t_only = torch.tensor([[2.0, 0.0]], requires_grad=True)
    (torch.nn.functional.cross_entropy(t_only, y)
     + 0.5 * (soft_kl(t_only, s1.detach(), 1.0) + soft_kl(t_only, s2.detach(), 1.0)) / 2).backward()
    torch.testing.assert_close(teacher.grad, t_only.grad)
    s_only = torch.tensor([[0.0, 0.0]], requires_grad=True)
    (soft_kl(teacher.detach(), s_only, 1.0) + 0.25 * torch.nn.functional.cross_entropy(s_only, y)).backward()
    torch.testing.assert_close(s1.grad, s_only.grad)


def test_compat_weight_zero_leaves_the_teacher_a_pure_ce_gradient():
    teacher = torch.tensor([[1.0, -1.0, 0.5]], requires_grad=True)
    out = gtn_loss(teacher, [torch.randn(1, 3, requires_grad=True)], torch.tensor([2]), 4.0, 0.0, 0.0)
    out.total.backward()
    expected = torch.softmax(teacher.detach(), 1) - torch.tensor([[0.0, 0.0, 1.0]])
    torch.testing.assert_close(teacher.grad, expected)
