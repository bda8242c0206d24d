"""ND as an add-on term of both objectives: the value is L_ND, its gradient reaches the student."""

import pytest
import torch

from kd3.methods.nd import nd_loss, teacher_class_means
from kd3.methods.objectives import KD3Objective, KDObjective, WithND
from kd3.models.distilled import distilled_from_teacher
from tests.unit.test_objectives import teacher_and_student


def objectives():
    teacher, backbone = teacher_and_student()
    yield "kd", KDObjective(backbone, 4.0, return_pooled=True), backbone, teacher
    teacher, backbone = teacher_and_student()
    student = distilled_from_teacher(backbone, teacher, (16, 8, 8))
    yield "kd3", KD3Objective(student, teacher, (16, 8, 8), return_pooled=True), backbone, teacher


@pytest.mark.parametrize("method", ["kd", "kd3"])
def test_nd_term_is_added_with_its_weight_and_trains_the_student_backbone(method):
    name, inner, backbone, teacher = next((o for o in objectives() if o[0] == method))
    objective = WithND(inner, backbone.feature_dim, teacher.feature_dim, weight=0.5)
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        t_out = teacher.extract(x)
    means, _ = teacher_class_means(t_out.pooled, t_out.logits.argmax(1), 4)
    means[means.norm(dim=1) == 0] = 1.0  # classes the random batch does not contain
    objective.set_class_means(means)
    out = objective(x, x, t_out.logits, torch.Generator().manual_seed(0), teacher_feature=t_out.pooled)
    assert "nd" in out.terms and set(out.tensors) == set(out.terms)
    assert out.loss.item() == pytest.approx(sum(out.terms.values()), rel=1e-5)
    # the term is λ·L_ND of the head's embedding of the backbone's pooled feature
    objective.eval()
    with torch.no_grad():
        pooled = backbone.pool(backbone.forward_features(x))
        expected = 0.5 * nd_loss(objective.head(pooled), t_out.pooled, t_out.logits.argmax(1), means)
        again = objective(x, x, t_out.logits, torch.Generator().manual_seed(0), teacher_feature=t_out.pooled)
    assert again.terms["nd"] == pytest.approx(expected.item(), rel=1e-5)
    objective.train()
    out = objective(x, x, t_out.logits, torch.Generator().manual_seed(0), teacher_feature=t_out.pooled)
    out.tensors["nd"].backward()
    assert backbone.features[0].weight.grad is not None and backbone.features[0].weight.grad.abs().sum() > 0
    assert objective.head.linear.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_nd_golden_value_when_embedding_is_the_class_direction():
    # f_s = 2·c/‖c‖, ‖f_t‖ = 1: cosine 1, denominator max(2, 1) = 2 → 1 − 2/2 = 0
    c = torch.tensor([[3.0, 4.0]])
    f_s = 2 * c / 5
    assert nd_loss(f_s, torch.tensor([[1.0, 0.0]]), torch.tensor([0]), c).item() == pytest.approx(0.0, abs=1e-7)
    # f_s orthogonal to c: 1 − 0 = 1
    assert nd_loss(torch.tensor([[4.0, -3.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]), c).item() == 1.0


def test_a_batch_of_one_sample_uses_running_statistics_and_needs_pooled_features():
    teacher, backbone = teacher_and_student()
    objective = WithND(KDObjective(backbone, 4.0, return_pooled=True), backbone.feature_dim, teacher.feature_dim)
    objective.set_class_means(torch.ones(4, teacher.feature_dim))
    x = torch.randn(1, 1, 16, 16)
    out = objective(x, None, teacher(x), teacher_feature=teacher.extract(x).pooled)
    assert torch.isfinite(out.loss) and objective.head.bn.training
    with pytest.raises(ValueError, match="return_pooled"):
        WithND(KDObjective(backbone, 4.0), backbone.feature_dim, teacher.feature_dim)
    # the class means are set every epoch by the train stage, never checkpointed
    assert not any("class_means" in k for k in objective.state_dict())
