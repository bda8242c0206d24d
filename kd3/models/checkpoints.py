"""Checkpoints: a plain state dict plus the metadata needed to rebuild and feed the model.

Saved with ``torch.save`` and read only with ``torch.load(weights_only=True)``: a checkpoint holds
tensors, numbers, strings, lists and dicts, never pickled objects. The metadata carries the input
preprocessing (size, channels, mean/std), so every stage feeds a model the way it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kd3 import __version__
from kd3.errors import Kd3Error
from kd3.models.base import Kd3Model
from kd3.models.registry import build_model
from kd3.runs import atomic_torch_save

FORMAT_VERSION = 1


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


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: ModelMeta, **extra: Any) -> None:
    """Write model weights + metadata (+ any plain extra entries, e.g. trainer state) atomically."""
    payload = {
        "kd3_checkpoint": FORMAT_VERSION,
        "kd3_version": __version__,
        "model": meta.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    payload.update(extra)
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a kd3 checkpoint with ``weights_only=True``; anything else is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise Kd3Error(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; the message is what matters
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Kd3Error(f"{path}: not loadable as a plain-weights checkpoint (weights_only=True refused it: "
                       f"{first[:200]})") from None
    if not isinstance(payload, dict) or "kd3_checkpoint" not in payload:
        raise Kd3Error(f"{path}: not a kd3 checkpoint (no 'kd3_checkpoint' entry)")
    if payload["kd3_checkpoint"] > FORMAT_VERSION:
        raise Kd3Error(f"{path}: written by a newer kd3 (format {payload['kd3_checkpoint']}); upgrade kd3")
    return payload


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Kd3Model, ModelMeta, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    payload = read_checkpoint(path)
    meta = ModelMeta.from_dict(payload["model"])
    model = build_model(meta.arch, meta.num_classes, meta.input.channels, meta.options)
    load_state_dict_strict(model, payload["state_dict"], str(path))
    model.to(device).eval()
    return model, meta, payload


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """load_state_dict that names the first offending keys instead of dumping every key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:3]}{' …' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:3]}{' …' if len(unexpected) > 3 else ''}")
    if mismatched:
        problems.append(f"shape mismatch {mismatched[:2]}{' …' if len(mismatched) > 2 else ''}")
    if problems:
        raise Kd3Error(f"{origin}: weights do not fit the architecture: {'; '.join(problems)}")
    model.load_state_dict(state)
