"""Device choice, seeding and torch settings shared by every stage."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

from kd3.config import RunSection
from kd3.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"run.device: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} asked for, but CUDA is not available here; use run.device=cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_algorithms() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` for eager code. The public call
    also sets torch.compile's flag, and so imports torch._inductor and torch._dynamo: ~2 s of every
    stage process's start on a CPU. kd3 runs eager only; the compiler's flag is set too once the
    compiler is loaded anyway (and whenever torch lacks the eager-only switch)."""
    eager_only = getattr(torch._C, "_set_deterministic_algorithms", None)
    if eager_only is None or "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        eager_only(True, warn_only=True)


def configure(run: RunSection) -> torch.device:
    """Apply run-wide torch settings and return the device."""
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    if run.deterministic:
        # needed by some CUDA kernels for deterministic mode; harmless on CPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        use_deterministic_algorithms()
        torch.backends.cudnn.benchmark = False
    seed_everything(run.seed)
    from kd3.dist import device_for

    return device_for(resolve_device(run.device))  # cuda:LOCAL_RANK under torchrun
