"""Trainer state that makes resume exact: RNG streams, the lr schedule, training-only weights."""

from __future__ import annotations

import math
import random
from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_factor(scheduler: str, epoch: int, epochs: int, step_milestones: list[float]) -> float:
    """Multiplier of the base lr for a 0-based epoch (schedules are per epoch, so resume is exact)."""
    if scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if scheduler == "step":
        return 0.1 ** sum(epoch >= round(m * epochs) for m in step_milestones)
    return 1.0


def student_prefix(objective: torch.nn.Module, student: torch.nn.Module) -> str:
    """Where the student sits in the objective's state dict ("student.", "inner.student." …)."""
    return next(name for name, module in objective.named_modules() if module is student) + "."


def training_only_state(objective: torch.nn.Module, student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The objective's own modules (projector, embedding heads), without the student's weights."""
    prefix = student_prefix(objective, student)
    return {k: v for k, v in objective.state_dict().items() if not k.startswith(prefix)}


def load_training_only_state(objective: torch.nn.Module, student: torch.nn.Module,
                             student_state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> None:
    """Restore the objective's own modules (the student's weights are loaded alongside, strictly)."""
    if extra:
        prefix = student_prefix(objective, student)
        objective.load_state_dict({**{f"{prefix}{k}": v for k, v in student_state.items()}, **extra})
