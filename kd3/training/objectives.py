"""The objective registry: how each training method is built from the config.

An entry turns the student network (built from ``train.student``) into the objective the loop
optimises, the module that is saved as the student, its checkpoint metadata and the teacher view
its batches need. Entries own everything method-specific (loading and freezing the teacher,
projectors, heads); the loop only sees :class:`kd3.methods.objectives.Objective`. Extra loss terms
(``train.extra_losses``) wrap any objective. Adding a method is one module with a registered
builder and its config section.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from kd3.compute import Compute
from kd3.config import PipelineConfig, resolve_path
from kd3.data.score_cache import TeacherOutputs
from kd3.errors import Kd3Error
from kd3.methods.nd import teacher_class_means
from kd3.methods.objectives import KD3Objective, KDObjective, Objective, WithND
from kd3.models import arch_options, check_checkpoint_code, load_model, read_checkpoint
from kd3.models.base import Kd3Model
from kd3.models.distilled import STUDENT_ARCH, distilled_from_teacher
from kd3.models.spec import InputSpec, ModelMeta
from kd3.registry import Registry


@dataclass
class BuildContext:
    """What a builder may use: the config, the score cache, the device and the student network."""

    cfg: PipelineConfig
    run_dir: Path
    scores: TeacherOutputs
    device: torch.device
    #: the student network of ``train.student`` (not yet on the device)
    backbone: Kd3Model
    #: the student's preprocessing (``train.student_input`` over the teacher's)
    student_input: InputSpec
    #: precision and memory format of the run (None: float32, contiguous)
    compute: Optional[Compute] = None

    def plain_meta(self) -> ModelMeta:
        """Checkpoint metadata of the bare student network."""
        t, teacher = self.cfg.train, self.scores.teacher
        return ModelMeta(arch=t.student.arch, options=arch_options(self.backbone, t.student.options),
                         num_classes=teacher.num_classes,
                         class_names=teacher.class_names, input=self.student_input)


@dataclass
class BuiltObjective:
    objective: Objective
    #: the module saved as the student (and deployed)
    student: torch.nn.Module
    meta: ModelMeta
    #: the teacher's preprocessing when the objective runs the teacher on its own view of each
    #: image (its input differs from the student's); None when no teacher view is needed
    teacher_view: Optional[InputSpec] = None


@dataclass(frozen=True)
class ObjectiveEntry:
    name: str
    build: Callable[[BuildContext], BuiltObjective]
    #: validate the objective's own inputs before any work (cfg, run_dir); None: nothing to check
    check: Optional[Callable[[PipelineConfig, Path], None]] = None
    #: the config section holding its settings (recorded in meta.json and the trainer state)
    section: Optional[str] = None


OBJECTIVES: Registry[ObjectiveEntry] = Registry("objective")
#: extra loss terms: name → (wrap(ctx, built objective) → objective, check)
EXTRA_LOSSES: Registry[tuple[Callable[[BuildContext, Objective], Objective],
                             Callable[[PipelineConfig, Path], None]]] = Registry("extra loss")


def _needs_pooled(cfg: PipelineConfig) -> bool:
    return bool(cfg.train.extra_losses)


# ---------------------------------------------------------------------------------------------- kd
def build_kd(ctx: BuildContext) -> BuiltObjective:
    """Plain KD on the cached teacher logits (the teacher is not even loaded)."""
    objective = KDObjective(ctx.backbone, ctx.cfg.train.temperature, return_pooled=_needs_pooled(ctx.cfg))
    return BuiltObjective(objective=objective, student=ctx.backbone, meta=ctx.plain_meta())


OBJECTIVES.register("kd", ObjectiveEntry("kd", build_kd), doc="plain KD: KL(p_T‖p_S)·τ² on cached teacher logits")


# --------------------------------------------------------------------------------------------- kd3
def check_kd3(cfg: PipelineConfig, run_dir: Path) -> None:
    teacher = resolve_path(cfg.score.teacher, run_dir)
    if not teacher.is_file():
        raise Kd3Error(f"{cfg.source}: score.teacher: file not found: {teacher} "
                       "(KD³ needs the teacher's feature maps and classifier during training)")
    check_checkpoint_code(teacher)


def build_kd3(ctx: BuildContext) -> BuiltObjective:
    """KD³ (METHODS.md §1b–1d): the frozen teacher's feature maps, its shared classifier, MixDistribution."""
    cfg, k = ctx.cfg, ctx.cfg.kd3
    teacher, loaded_meta, _ = load_model(resolve_path(cfg.score.teacher, ctx.run_dir), ctx.device)
    if ctx.compute is not None:
        teacher = ctx.compute.model(teacher)  # channels_last where that is on
    if not getattr(teacher, "supports_feature_alignment", True):
        raise Kd3Error(f"teacher {loaded_meta.arch!r} exposes no feature map that reproduces its logits "
                       "(e.g. a class-token ViT), so KD³'s alignment is unavailable; use train.objective=kd "
                       "or an average-pooled teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        probe = torch.zeros(1, loaded_meta.input.channels, loaded_meta.input.image_size,
                            loaded_meta.input.image_size, device=ctx.device)
        map_shape = tuple(int(v) for v in teacher.forward_features(probe).shape[1:])
    teacher_meta = ctx.scores.teacher
    if k.shared_classifier:
        student = distilled_from_teacher(ctx.backbone, teacher, map_shape, k.projector_factor)
        t = cfg.train
        meta = ModelMeta(arch=STUDENT_ARCH, num_classes=teacher_meta.num_classes, class_names=teacher_meta.class_names,
                         input=ctx.student_input, options={
                             "student": {"arch": t.student.arch,
                                         "options": arch_options(ctx.backbone, t.student.options)},
                             "teacher": {"arch": loaded_meta.arch, "options": dict(loaded_meta.options),
                                         "in_channels": loaded_meta.input.channels},
                             "teacher_map_shape": list(map_shape), "projector_factor": k.projector_factor})
    else:
        student, meta = ctx.backbone, ctx.plain_meta()
    objective = KD3Objective(
        student, teacher, map_shape, feature_alignment=k.feature_alignment, feature_weight=k.feature_weight,
        mixdistribution=k.mixdistribution, mix_beta=k.mix_beta, mix_p=k.mix_p,
        contrastive_weight=k.contrastive_weight, contrastive_temperature=k.contrastive_temperature,
        embed_dim=k.embed_dim, teacher_contrastive=k.teacher_contrastive, kl_weight=k.kl_weight,
        kl_temperature=cfg.train.temperature, projector_factor=k.projector_factor,
        return_pooled=_needs_pooled(cfg))
    # the teacher runs on its own view when its preprocessing differs from the student's
    view = teacher_meta.input if teacher_meta.input != ctx.student_input else None
    return BuiltObjective(objective=objective, student=student, meta=meta, teacher_view=view)


OBJECTIVES.register("kd3", ObjectiveEntry("kd3", build_kd3, check=check_kd3, section="kd3"),
                    doc="KD³: weighted feature alignment, shared teacher classifier, MixDistribution")


# ---------------------------------------------------------------------------------------------- nd
def _checkpoint_class_means(cfg: PipelineConfig, run_dir: Path) -> torch.Tensor:
    path = resolve_path(cfg.score.teacher, run_dir)
    means = read_checkpoint(path).get("class_means")
    if not isinstance(means, torch.Tensor) or means.dim() != 2 or not means.is_floating_point():
        raise Kd3Error(f"{path}: no 'class_means' tensor [K, D] for train.nd_class_means=teacher_checkpoint; "
                       "use train.nd_class_means=pseudo_labels")
    return means.float()


def check_nd(cfg: PipelineConfig, run_dir: Path) -> None:
    if cfg.train.nd_class_means == "teacher_checkpoint":
        _checkpoint_class_means(cfg, run_dir)  # fail before any work when they are missing


def nd_class_means(scores: TeacherOutputs, rows: torch.Tensor) -> torch.Tensor:
    """c_k [K, D_T] over the given score-cache rows: cached pooled teacher features grouped by the
    teacher's pseudo-label (argmax of the cached logits); a class without samples gets a zero row."""
    idx = torch.sort(rows.long()).values
    return teacher_class_means(scores.features[idx], scores.logits[idx].argmax(1), scores.logits.shape[1])[0]


def wrap_nd(ctx: BuildContext, objective: Objective) -> Objective:
    """ND (METHODS.md §4) around any objective: class means per epoch, or fixed from the teacher checkpoint."""
    t, scores = ctx.cfg.train, ctx.scores
    per_epoch = None
    if t.nd_class_means == "pseudo_labels":
        per_epoch = lambda rows: nd_class_means(scores, rows)  # noqa: E731
    wrapped = WithND(objective, ctx.backbone.feature_dim, scores.features.shape[1], weight=t.nd_weight,
                     dropout=t.nd_dropout, means_for_rows=per_epoch)
    if per_epoch is None:
        means = _checkpoint_class_means(ctx.cfg, ctx.run_dir)
        expected = (scores.logits.shape[1], scores.features.shape[1])
        if tuple(means.shape) != expected:
            raise Kd3Error(f"{ctx.cfg.score.teacher}: class_means has shape {tuple(means.shape)}, expected "
                           f"[{expected[0]}, {expected[1]}] (classes, teacher feature dim)")
        wrapped.set_class_means(means)
    return wrapped


EXTRA_LOSSES.register("nd", (wrap_nd, check_nd), doc="ND: norm and direction alignment to teacher class means")


# ------------------------------------------------------------------------------------------ build
def check_objective(cfg: PipelineConfig, run_dir: Path) -> ObjectiveEntry:
    """Validate the objective and extra-loss names and their own inputs (before any work)."""
    entry = OBJECTIVES.get(cfg.train.objective)
    if entry.check is not None:
        entry.check(cfg, run_dir)
    for name in cfg.train.extra_losses:
        EXTRA_LOSSES.get(name)[1](cfg, run_dir)
    return entry


def build_objective(ctx: BuildContext) -> BuiltObjective:
    """The registered objective of ``train.objective``, wrapped by each of ``train.extra_losses``."""
    built = OBJECTIVES.get(ctx.cfg.train.objective).build(ctx)
    for name in ctx.cfg.train.extra_losses:
        built.objective = EXTRA_LOSSES.get(name)[0](ctx, built.objective)
    return built
