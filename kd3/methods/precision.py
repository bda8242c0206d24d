"""Losses in float32 under mixed precision.

Under ``torch.autocast`` the networks' outputs arrive in bf16 / fp16, and autocast would also run
a loss's own matmuls (NT-Xent's similarity matrix) in low precision. Every kd3 loss is computed in
float32 instead, with autocast off: in fp16, exp(z/τ) inside a softmax overflows for logits above
~11·τ (65504 is fp16's largest value) and tiny probabilities underflow to log(0); in bf16 (8 bits of
mantissa) a KL summed over K classes, or a feature-alignment mean over a map, loses the small
differences that are the whole learning signal late in training. Autocast's own float32 op lists
differ between CUDA and the CPU, so the cast is explicit. Outside autocast nothing changes (the
same tensors reach the same code: float32 results stay bit-identical).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])
_DEVICE_TYPES = ("cpu", "cuda")


def autocast_enabled() -> bool:
    return any(torch.is_autocast_enabled(d) for d in _DEVICE_TYPES)


@contextlib.contextmanager
def float32_region() -> Iterator[None]:
    """Autocast switched off for every device type that has it on (a no-op outside autocast)."""
    with contextlib.ExitStack() as stack:
        for device_type in _DEVICE_TYPES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


def float32_loss(fn: F) -> F:
    """Decorate a loss: under autocast its half-precision tensor arguments become float32 and it runs
    with autocast off (gradients flow back through the casts); outside autocast it is called as is."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not autocast_enabled():
            return fn(*args, **kwargs)
        with float32_region():
            return fn(*(_to_float32(a) for a in args), **{k: _to_float32(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
