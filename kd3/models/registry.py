"""Model registry: architecture name → constructor ``fn(num_classes, in_channels, **options)``.

Every constructor returns a :class:`kd3.models.base.Kd3Model`, so the losses can get the uniform
(feature map, pooled feature, logits) triple from any teacher or student.
"""

from __future__ import annotations

from typing import Any, Callable

from kd3.errors import Kd3Error
from kd3.models.base import Kd3Model
from kd3.models.small_cnn import SmallCNN
from kd3.registry import Registry

ModelFactory = Callable[..., Kd3Model]
MODELS: Registry[ModelFactory] = Registry("model architecture")


@MODELS.register("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 1, **options: Any) -> Kd3Model:
    """Small conv-BN-ReLU CNN (demo teacher and student); options: widths, convs_per_stage, dropout."""
    if "widths" in options:
        options["widths"] = tuple(options["widths"])
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, **options)


def build_model(arch: str, num_classes: int, in_channels: int, options: dict[str, Any] | None = None) -> Kd3Model:
    """Construct ``arch`` with its options; a bad option is a one-line error naming it."""
    factory = MODELS.get(arch)
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, **dict(options or {}))
    except TypeError as exc:
        raise Kd3Error(f"model {arch!r}: bad options {dict(options or {})}: {exc}") from None
