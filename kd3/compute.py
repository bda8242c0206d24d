"""How a stage computes on its device: numeric precision, memory format, host→device copies and
DataLoader options (``run.precision``, ``run.channels_last``, ``run.pin_memory``; the per-stage
``persistent_workers`` / ``prefetch_factor``).

Every ``auto`` resolves to what is fastest on CUDA and to plain float32, contiguous tensors and
blocking copies on the CPU, so a CPU run computes exactly what it did before these keys existed
(resolution: :func:`resolve_precision`, :func:`resolve_channels_last`, :func:`resolve_pin_memory`).
:class:`Compute` is the resolved result a stage hands to its loops: ``autocast()`` around model
forwards (never around ``backward``), ``images()`` for the input batches, ``model()`` for a network,
``grad_scaler()`` for fp16 training and ``loader()`` for the DataLoaders.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from kd3.data.images import normalize
from kd3.data.shards import LoaderOptions
from kd3.models.spec import InputSpec

#: the autocast dtype of each precision (fp32: autocast off)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(setting: str, device: torch.device) -> str:
    """``run.precision`` → "fp32", "bf16" or "fp16". ``auto``: bf16 on a CUDA device that supports
    it, else fp16 (with a gradient scaler when training); fp32 on the CPU (CPU autocast is slower
    than float32 there for small convnets and would change today's CPU results)."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_channels_last(setting: Union[str, bool], device: torch.device) -> bool:
    """``run.channels_last``: ``auto`` is on for CUDA (tensor-core convolutions want NHWC), off on the CPU."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def resolve_pin_memory(setting: Union[str, bool], device: torch.device) -> bool:
    """``run.pin_memory``: page-locked loader batches only help (and only exist) with a CUDA device."""
    return device.type == "cuda" and (setting == "auto" or bool(setting))


def has_conv(model: torch.nn.Module) -> bool:
    """Whether the network has a 2-D convolution (only those gain from channels_last)."""
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


@dataclass(frozen=True)
class Compute:
    """The resolved settings of one stage on one device (the default: float32 on the CPU, as before)."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    channels_last: bool = False
    pin_memory: bool = False

    @classmethod
    def from_config(cls, run: Any, device: torch.device) -> "Compute":
        """From the ``run`` section (:class:`kd3.config.RunSection`) and the stage's device."""
        return cls(device=device, precision=resolve_precision(run.precision, device),
                   channels_last=resolve_channels_last(run.channels_last, device),
                   pin_memory=resolve_pin_memory(run.pin_memory, device))

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision around model forwards: matmuls and convolutions in bf16/fp16, weights and
        gradients stay float32; a no-op context at fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """fp16 gradients underflow without loss scaling; bf16 has float32's exponent range and needs none."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the device, its 4-D weights in channels_last where that is on and the model convolves."""
        model = model.to(self.device)
        if self.channels_last and has_conv(model):
            model = model.to(memory_format=torch.channels_last)
        return model

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device (asynchronously from pinned loader memory)."""
        return tensor.to(self.device, non_blocking=self.pin_memory)

    def images(self, batch: torch.Tensor, spec: Optional[InputSpec]) -> torch.Tensor:
        """A uint8 image batch [B, C, H, W] → normalised for ``spec`` on the device (channels_last when on)."""
        x = normalize(self.to_device(batch), spec)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def loader(self, num_workers: int, persistent_workers: bool = False,
               prefetch_factor: Optional[int] = None) -> LoaderOptions:
        """A stage's DataLoader options (``<section>.num_workers`` …) with this device's pinning."""
        return LoaderOptions(num_workers, self.pin_memory, persistent_workers, prefetch_factor)

    def section_loader(self, section: Any) -> LoaderOptions:
        """:meth:`loader` from a config section with loader keys (:class:`kd3.config.LoaderSection`)."""
        return self.loader(section.num_workers, section.persistent_workers, section.prefetch_factor)
