"""KD³'s deployed student: student backbone → projector → the teacher's frozen head (METHODS.md §1b).

The teacher head is carved out of a teacher model generically: we find which parameters
``teacher.head(feature_map)`` actually uses (a gradient probe on a dummy map) and replace every
sub-module that holds none of them with ``nn.Identity``. The checkpoint then holds only the
student backbone, the projector and the teacher's head, and rebuilding it repeats the same pruning
on a freshly built teacher architecture, so the state dict keys match.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd3.models.base import Kd3Model
from kd3.models.projector import Projector

STUDENT_ARCH = "kd3_student"


def _head_parameter_names(model: Kd3Model, map_shape: tuple[int, int, int]) -> set[str]:
    probe = torch.randn(2, *map_shape, requires_grad=False)
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.grad = None
    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    model.head(probe).sum().backward()
    used = {n for n, p in params.items() if p.grad is not None}
    for n, p in params.items():
        p.grad = None
        p.requires_grad_(saved[n])
    model.train(was_training)
    if not used:
        raise ValueError("the teacher's head uses no parameters; cannot share its classifier")
    return used


def prune_to_head(model: Kd3Model, map_shape: tuple[int, int, int]) -> Kd3Model:
    """Replace (in place) every sub-module holding no head parameter with nn.Identity; return the model."""
    used = _head_parameter_names(model, map_shape)

    def prune(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            full = f"{prefix}{name}."
            names = [full + n for n, _ in child.named_parameters()]
            if not names:
                continue  # parameter-free (pooling, activations): keep, the head may call it
            if not any(n in used for n in names):
                setattr(module, name, nn.Identity())
            elif not all(n in used for n in names):
                prune(child, full)

    prune(model, "")
    return model


class DistilledStudent(Kd3Model):
    """Images → student feature map → projector (to the teacher's map shape) → teacher head → logits.

    Its own ``forward_features`` is the projected map, in the teacher's feature space, so
    ``extract()`` gives the uniform triple for evaluation and further losses.
    """

    def __init__(self, backbone: Kd3Model, teacher_head: Kd3Model, teacher_map_shape: tuple[int, int, int],
                 projector_factor: int = 2):
        super().__init__()
        self.backbone = backbone
        self.projector = Projector(backbone.feature_channels, teacher_map_shape[0], factor=projector_factor)
        self.teacher_head = teacher_head
        for p in self.teacher_head.parameters():
            p.requires_grad_(False)
        self.teacher_map_size = tuple(teacher_map_shape[1:])
        self.feature_channels = teacher_map_shape[0]
        self.feature_dim = teacher_head.feature_dim
        self.num_classes = teacher_head.num_classes

    def train(self, mode: bool = True) -> "DistilledStudent":
        super().train(mode)
        self.teacher_head.eval()  # frozen: no dropout, no BN statistics updates
        return self

    def student_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def project(self, student_map: torch.Tensor) -> torch.Tensor:
        return self.projector(student_map, self.teacher_map_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.student_features(x))

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.teacher_head.pool(feature_map)

    def classifier(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.teacher_head.classifier(pooled)


def build_distilled_student(num_classes: int, in_channels: int, student: dict[str, Any], teacher: dict[str, Any],
                            teacher_map_shape: list[int], projector_factor: int = 2) -> DistilledStudent:
    """Registry constructor: ``student``/``teacher`` are {arch, options[, in_channels]} specs."""
    from kd3.models.registry import build_model

    backbone = build_model(student["arch"], num_classes, in_channels, student.get("options", {}))
    teacher_model = build_model(teacher["arch"], num_classes, int(teacher.get("in_channels", in_channels)),
                                teacher.get("options", {}))
    shape = tuple(int(v) for v in teacher_map_shape)
    return DistilledStudent(backbone, prune_to_head(teacher_model, shape), shape, projector_factor)


def distilled_from_teacher(backbone: Kd3Model, teacher: Kd3Model, teacher_map_shape: tuple[int, int, int],
                           projector_factor: int = 2) -> DistilledStudent:
    """Build the training-time student around a deep copy of a loaded teacher's head (weights kept)."""
    import copy

    head = prune_to_head(copy.deepcopy(teacher).cpu(), teacher_map_shape)
    return DistilledStudent(backbone, head, teacher_map_shape, projector_factor)


def _register() -> None:
    from kd3.models.registry import MODELS

    if STUDENT_ARCH not in MODELS:
        MODELS.register(STUDENT_ARCH, build_distilled_student,
                        doc="KD³ student: backbone + projector + the teacher's frozen head (saved by train)")


_register()


def load_student(path, device: torch.device | str = "cpu") -> Kd3Model:
    """Load any trained kd3 student checkpoint as one inference module (images → logits)."""
    from kd3.models.checkpoints import load_model

    return load_model(path, device)[0]
