"""What a model needs besides its weights: input preprocessing and the metadata to rebuild it.

A leaf module (imports nothing from kd3), so data readers, model adapters and checkpoints can all
use these types without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class InputSpec:
    """How images must be prepared for a model."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        return cls(image_size=int(data["image_size"]), channels=int(data["channels"]),
                   mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ModelMeta:
    arch: str
    options: dict[str, Any]
    num_classes: int
    class_names: list[str]
    input: InputSpec

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "options": dict(self.options), "num_classes": self.num_classes,
                "class_names": list(self.class_names), "input": self.input.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMeta":
        return cls(arch=data["arch"], options=dict(data.get("options", {})), num_classes=int(data["num_classes"]),
                   class_names=list(data.get("class_names") or [str(i) for i in range(int(data["num_classes"]))]),
                   input=InputSpec.from_dict(data["input"]))
