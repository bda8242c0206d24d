"""KD³ objective wiring: which terms exist, where gradients flow, and the deployed student."""

import pytest
import torch

from kd3.methods.objectives import KD3Objective, KDObjective
from kd3.models import build_model, load_model, save_checkpoint
from kd3.models.checkpoints import InputSpec, ModelMeta
from kd3.models.distilled import STUDENT_ARCH, distilled_from_teacher, prune_to_head


def teacher_and_student():
    torch.manual_seed(0)
    teacher = build_model("small_cnn", 4, 1, {"widths": [8, 16]}).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    backbone = build_model("small_cnn", 4, 1, {"widths": [4, 6], "convs_per_stage": 1})
    return teacher, backbone


def test_prune_to_head_keeps_only_the_classifier():
    teacher, _ = teacher_and_student()
    head = prune_to_head(build_model("small_cnn", 4, 1, {"widths": [8, 16]}), (16, 8, 8))
    assert sorted(head.state_dict()) == ["fc.bias", "fc.weight"]
    assert teacher.head(torch.ones(2, 16, 8, 8)).shape == (2, 4)


def test_shared_classifier_student_uses_the_teacher_head_frozen():
    teacher, backbone = teacher_and_student()
    student = distilled_from_teacher(backbone, teacher, (16, 8, 8))
    fmap = torch.randn(3, 16, 8, 8)
    assert torch.allclose(student.head(fmap), teacher.head(fmap))
    student.train()
    assert not student.teacher_head.training
    assert all(not p.requires_grad for p in student.teacher_head.parameters())


def test_kd3_terms_follow_the_switches_and_gradients_reach_only_trainable_parts():
    teacher, backbone = teacher_and_student()
    student = distilled_from_teacher(backbone, teacher, (16, 8, 8))
    objective = KD3Objective(student, teacher, (16, 8, 8), kl_weight=0.5)
    x = torch.randn(4, 1, 16, 16)
    z_t = teacher(x)
    out = objective(x, x, z_t, torch.Generator().manual_seed(0))
    assert set(out.terms) == {"fa", "con_s", "con_t", "kl"}
    assert out.loss.item() == pytest.approx(sum(out.terms.values()), rel=1e-5)
    assert out.weights.shape == (4,) and bool(((out.weights >= 0.5) & (out.weights <= 1)).all())
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.teacher_head.parameters())
    assert student.projector.net[0].weight.grad is not None
    assert backbone.features[0].weight.grad is not None
    assert objective.g_t.linear.weight.grad is not None


def test_teacher_contrastive_term_never_reaches_the_student():
    teacher, backbone = teacher_and_student()
    student = distilled_from_teacher(backbone, teacher, (16, 8, 8))
    objective = KD3Objective(student, teacher, (16, 8, 8))
    x = torch.randn(4, 1, 16, 16)
    out = objective(x, x, teacher(x), torch.Generator().manual_seed(0))
    trainable = [p for p in student.parameters() if p.requires_grad]
    grads_t = torch.autograd.grad(out.tensors["con_t"], trainable, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads_t)
    grads_s = torch.autograd.grad(out.tensors["con_s"], trainable, allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads_s)


def test_switches_off_remove_terms_and_modules():
    teacher, backbone = teacher_and_student()
    objective = KD3Objective(backbone, teacher, (16, 8, 8), mixdistribution=False, kl_weight=1.0)
    x = torch.randn(4, 1, 16, 16)
    out = objective(x, x, teacher(x))
    assert set(out.terms) == {"fa", "kl"}
    assert objective.g_s is None and objective.g_t is None and objective.projector is not None


def test_plain_kd_objective_never_calls_a_teacher():
    _, backbone = teacher_and_student()
    out = KDObjective(backbone, 4.0)(torch.randn(2, 1, 16, 16), None, torch.randn(2, 4))
    assert set(out.terms) == {"kd"} and out.weights is None


def test_deployed_student_round_trips_as_one_inference_model(tmp_path):
    teacher, backbone = teacher_and_student()
    student = distilled_from_teacher(backbone, teacher, (16, 8, 8)).eval()
    meta = ModelMeta(arch=STUDENT_ARCH, num_classes=4, class_names=list("abcd"),
                     input=InputSpec(image_size=16, channels=1, mean=(0.5,), std=(0.25,)),
                     options={"student": {"arch": "small_cnn", "options": {"widths": [4, 6], "convs_per_stage": 1}},
                              "teacher": {"arch": "small_cnn", "options": {"widths": [8, 16]}, "in_channels": 1},
                              "teacher_map_shape": [16, 8, 8], "projector_factor": 2})
    save_checkpoint(tmp_path / "s.pt", student, meta)
    keys = torch.load(tmp_path / "s.pt", weights_only=True)["state_dict"].keys()
    assert not any(k.startswith("teacher_head.features") for k in keys)  # no teacher backbone shipped
    from kd3.models import load_student

    loaded = load_student(tmp_path / "s.pt")
    x = torch.randn(3, 1, 16, 16)
    assert torch.allclose(loaded(x), student(x), atol=1e-6)
    assert load_model(tmp_path / "s.pt")[1].arch == STUDENT_ARCH
