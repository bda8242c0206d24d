"""Training objectives: what one optimisation step computes, as torch modules without I/O.

An objective owns the student and any training-only parts (projector, embedding heads), takes a
batch (student view, teacher view, cached teacher logits) and returns the total loss, its named
terms and the per-sample feature-alignment weights. Add-on terms (ND) wrap an objective
(:class:`WithND`) and read the student's pooled feature from its :class:`StepOutput`, so they
work with every method without a second forward pass. The training engine (:mod:`kd3.training`)
does the looping and I/O; it knows objectives only through :class:`Objective`'s interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from kd3.methods.kd import kd_loss
from kd3.methods.kd3_losses import feature_weights, nt_xent, weighted_feature_alignment
from kd3.methods.mixdistribution import _sample_beta, mix_distribution
from kd3.methods.nd import NDEmbeddingHead, nd_loss
from kd3.models.base import Kd3Model
from kd3.models.distilled import DistilledStudent
from kd3.models.projector import EmbeddingHead, Projector


@dataclass
class StepOutput:
    loss: torch.Tensor
    #: named loss terms (already weighted as they enter the total), as Python floats
    terms: dict[str, float]
    #: per-sample feature-alignment weights w_i [B] (None when the method has none)
    weights: Optional[torch.Tensor] = None
    #: the same terms as graph-attached tensors (for gradient checks and custom logging)
    tensors: Optional[dict[str, torch.Tensor]] = None
    #: the student backbone's pooled feature [B, D_S], graph-attached (set with return_pooled=True)
    student_pooled: Optional[torch.Tensor] = None
    #: the student's logits [B, K] of this step's forward (before the update), graph-attached; the
    #: loop logs agreement with the teacher from them, so no extra forward is needed for logging
    student_logits: Optional[torch.Tensor] = None


class Objective(nn.Module):
    """What the training loop knows of a method: a step, and an optional hook.

    ``forward(x_student, x_teacher, teacher_logits, generator, *, teacher_feature=None)`` returns a
    :class:`StepOutput`; ``teacher_feature`` is the score cache's pooled teacher feature [B, D_T]
    (objectives that do not use it ignore it). Objectives with ``uses_teacher_feature_map`` also
    take ``teacher_feature_map`` [B, C, h, w], the score cache's teacher feature maps when it has
    them (then they need not run the teacher for them). ``student`` is the module that is saved and
    deployed.
    """

    #: whether the objective runs the (frozen) teacher itself, on a teacher view of the batch
    needs_teacher = False
    #: whether forward takes ``teacher_feature_map`` (cached teacher feature maps of the batch)
    uses_teacher_feature_map = False

    def begin_epoch(self, epoch: int, rows: torch.Tensor) -> None:
        """Called before each epoch with the score-cache rows [n] the epoch trains on."""


class KDObjective(Objective):
    """Plain KD: KL(p_T ‖ p_S)·τ² against cached teacher logits; the teacher is never run."""

    def __init__(self, student: Kd3Model, temperature: float, return_pooled: bool = False):
        super().__init__()
        self.student = student
        self.temperature = temperature
        self.return_pooled = return_pooled

    def forward(self, x_student: torch.Tensor, x_teacher: Optional[torch.Tensor], teacher_logits: torch.Tensor,
                generator: Optional[torch.Generator] = None, *,
                teacher_feature: Optional[torch.Tensor] = None) -> StepOutput:
        pooled = None
        if self.return_pooled:
            out = self.student.extract(x_student)  # the same logits as forward, plus the pooled feature
            logits, pooled = out.logits, out.pooled
        else:
            logits = self.student(x_student)
        loss = kd_loss(logits, teacher_logits, self.temperature)
        return StepOutput(loss=loss, terms={"kd": loss.item()}, tensors={"kd": loss}, student_pooled=pooled,
                          student_logits=logits)


class KD3Objective(Objective):
    """KD³ (METHODS.md §1b–1d): weighted feature alignment through a projector, the teacher's
    frozen classifier shared by the student, and the MixDistribution contrastive block.

    ``student`` is a :class:`DistilledStudent` when the classifier is shared (its projector and the
    teacher head live inside it and are deployed), else a plain student with a training-only
    projector for feature alignment. The student-side contrastive term uses the student
    backbone's own pooled feature (so its gradient reaches the backbone directly); the teacher-side
    term trains only ``g_T`` (the teacher is frozen and no gradient path reaches the student).
    """

    needs_teacher = True

    def __init__(self, student: Kd3Model, teacher: Kd3Model, teacher_map_shape: tuple[int, int, int], *,
                 feature_alignment: bool = True, feature_weight: str = "sigmoid", mixdistribution: bool = True,
                 mix_beta: float = 0.1, mix_p: float = 1.0, contrastive_weight: float = 0.001,
                 contrastive_temperature: float = 0.3, embed_dim: int = 128, teacher_contrastive: bool = True,
                 kl_weight: float = 0.0, kl_temperature: float = 4.0, projector_factor: int = 2,
                 return_pooled: bool = False):
        super().__init__()
        self.student = student
        self.return_pooled = return_pooled
        self.shared = isinstance(student, DistilledStudent)
        backbone = student.backbone if self.shared else student
        self.projector = None if self.shared else Projector(backbone.feature_channels, teacher_map_shape[0],
                                                            factor=projector_factor)
        self.teacher_map_size = tuple(teacher_map_shape[1:])
        # the frozen teacher is kept out of this module's parameters and state dict on purpose
        self.__dict__["teacher"] = teacher
        self.feature_alignment = feature_alignment
        self.feature_weight = feature_weight
        self.mixdistribution = mixdistribution
        self.mix_beta, self.mix_p = mix_beta, mix_p
        self.contrastive_weight = contrastive_weight
        self.contrastive_temperature = contrastive_temperature
        self.teacher_contrastive = teacher_contrastive and mixdistribution
        self.kl_weight, self.kl_temperature = kl_weight, kl_temperature
        self.g_s = EmbeddingHead(backbone.feature_dim, embed_dim) if mixdistribution else None
        self.g_t = EmbeddingHead(teacher.feature_dim, embed_dim) if self.teacher_contrastive else None

    @property
    def backbone(self) -> Kd3Model:
        return self.student.backbone if self.shared else self.student

    def _project(self, student_map: torch.Tensor) -> torch.Tensor:
        if self.shared:
            return self.student.project(student_map)
        return self.projector(student_map, self.teacher_map_size)

    @property
    def uses_teacher_feature_map(self) -> bool:
        return self.feature_alignment

    def forward(self, x_student: torch.Tensor, x_teacher: torch.Tensor, teacher_logits: torch.Tensor,
                generator: Optional[torch.Generator] = None, *,
                teacher_feature: Optional[torch.Tensor] = None,
                teacher_feature_map: Optional[torch.Tensor] = None) -> StepOutput:
        teacher = self.__dict__["teacher"]
        t_out = None
        if teacher_feature_map is None or self.teacher_contrastive:
            with torch.no_grad():
                t_out = teacher.extract(x_teacher)
        # the teacher is frozen and in eval mode: its cached map is the map it would compute here
        t_map = teacher_feature_map if teacher_feature_map is not None else t_out.feature_map
        student_map = self.backbone.forward_features(x_student)
        projected = self._project(student_map)
        logits = self.student.head(projected) if self.shared else self.backbone.head(student_map)
        weights = feature_weights(logits, teacher_logits, mode=self.feature_weight)
        terms: dict[str, torch.Tensor] = {}
        if self.feature_alignment:
            terms["fa"] = weighted_feature_alignment(projected, t_map, weights)
        # the backbone's own pooled feature: the contrastive head's input, and ND's
        f_s = self.backbone.pool(student_map) if (self.mixdistribution or self.return_pooled) else None
        if self.mixdistribution:
            batch = x_student.shape[0]
            # one λ and permutation for both views, so student and teacher see the same perturbation
            lam = _sample_beta(batch, self.mix_beta, generator).to(x_student.device)
            perm = torch.randperm(batch, generator=generator).to(x_student.device)
            if self.mix_p < 1 and torch.rand(1, generator=generator).item() >= self.mix_p:
                lam = torch.ones_like(lam)  # this batch is left unperturbed (probability 1 − p)
            x_mix = mix_distribution(x_student, lam=lam, perm=perm)
            f_s_mix = self.backbone.pool(self.backbone.forward_features(x_mix))
            terms["con_s"] = self.contrastive_weight * nt_xent(self.g_s(f_s), self.g_s(f_s_mix),
                                                               self.contrastive_temperature)
            if self.teacher_contrastive:
                with torch.no_grad():
                    x_t_mix = x_mix if x_teacher is x_student else mix_distribution(
                        x_teacher, lam=lam, perm=perm)
                    f_t_mix = teacher.extract(x_t_mix).pooled
                terms["con_t"] = self.contrastive_weight * nt_xent(self.g_t(t_out.pooled), self.g_t(f_t_mix),
                                                                   self.contrastive_temperature)
        if self.kl_weight > 0:
            terms["kl"] = self.kl_weight * kd_loss(logits, teacher_logits, self.kl_temperature)
        loss = torch.stack(list(terms.values())).sum()
        return StepOutput(loss=loss, terms={k: v.item() for k, v in terms.items()}, weights=weights, tensors=terms,
                          student_pooled=f_s if self.return_pooled else None, student_logits=logits)


class WithND(Objective):
    """Any objective plus the ND term (METHODS.md §4): L = L_inner + λ·L_ND.

    L_ND = (1/B) Σ_i [1 − ⟨f_s,i, c_y/‖c_y‖⟩ / max(‖f_s,i‖, ‖f_t,i‖)] with f_s = g(student backbone's
    pooled feature), g = :class:`NDEmbeddingHead` (BN1d → Dropout → Linear to the teacher's
    feature dim D_T, training-only), f_t the teacher's pooled feature [B, D_T] (the score cache),
    y = argmax of the cached teacher logits (the teacher's pseudo-label) and c [K, D_T] the class
    means set with :meth:`set_class_means`. The inner objective must be built with
    ``return_pooled=True``. A batch of one sample is embedded with the head's running BN
    statistics (BN1d cannot normalise a single sample by its own statistics). With
    ``means_for_rows`` the class means are recomputed at every epoch start from the rows that epoch
    trains on (:meth:`begin_epoch`); without it they are fixed by :meth:`set_class_means`.
    """

    def __init__(self, inner: Objective, student_dim: int, teacher_dim: int, weight: float = 1.0,
                 dropout: float = 0.0, means_for_rows: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        super().__init__()
        if not getattr(inner, "return_pooled", False):
            raise ValueError("WithND needs an objective built with return_pooled=True")
        self.inner = inner
        self.head = NDEmbeddingHead(student_dim, teacher_dim, dropout)
        self.weight = weight
        self.means_for_rows = means_for_rows
        # recomputed every epoch from the samples it trains on (or fixed); not checkpointed
        self.register_buffer("class_means", torch.zeros(0, teacher_dim), persistent=False)

    @property
    def student(self) -> Kd3Model:
        return self.inner.student

    @property
    def needs_teacher(self) -> bool:
        return self.inner.needs_teacher

    @property
    def uses_teacher_feature_map(self) -> bool:
        return self.inner.uses_teacher_feature_map

    def begin_epoch(self, epoch: int, rows: torch.Tensor) -> None:
        self.inner.begin_epoch(epoch, rows)
        if self.means_for_rows is not None:
            self.set_class_means(self.means_for_rows(rows))

    def set_class_means(self, means: torch.Tensor) -> None:
        """Teacher class means c [K, D_T] (zero rows for classes without samples)."""
        if means.dim() != 2 or means.shape[1] != self.head.linear.out_features:
            raise ValueError(f"class means must be [K, {self.head.linear.out_features}], got {tuple(means.shape)}")
        self.class_means = means.detach().to(self.class_means.device, torch.float32)

    def forward(self, x_student: torch.Tensor, x_teacher: Optional[torch.Tensor], teacher_logits: torch.Tensor,
                generator: Optional[torch.Generator] = None, *, teacher_feature: torch.Tensor,
                teacher_feature_map: Optional[torch.Tensor] = None) -> StepOutput:
        if self.class_means.numel() == 0:
            raise ValueError("WithND: call set_class_means before the first step")
        maps = {"teacher_feature_map": teacher_feature_map} if teacher_feature_map is not None else {}
        step = self.inner(x_student, x_teacher, teacher_logits, generator, **maps)
        pooled = step.student_pooled
        single = self.training and pooled.shape[0] == 1
        if single:
            self.head.bn.eval()
        embedding = self.head(pooled)
        if single:
            self.head.bn.train()
        term = self.weight * nd_loss(embedding, teacher_feature, teacher_logits.argmax(1), self.class_means)
        tensors = {**(step.tensors or {}), "nd": term}
        return StepOutput(loss=step.loss + term, terms={**step.terms, "nd": term.item()}, weights=step.weights,
                          tensors=tensors, student_pooled=pooled, student_logits=step.student_logits)
