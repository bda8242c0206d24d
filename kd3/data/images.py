"""One preprocessing path for every image source (web shards, .npz evaluation sets).

Images stay uint8 [C, H, W] until the last step so web samples and evaluation arrays are resized
and normalised by exactly the same code, with the model's own :class:`InputSpec`.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from kd3.models.spec import InputSpec

# ITU-R 601 luma, as PIL's convert("L")
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded bytes → uint8 [C, H, W] with C = 1 (grey) or 3 (RGB). Raises on undecodable bytes."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L") if img.mode in ("1", "L", "I", "I;16", "F") else img.convert("RGB")
        array = np.asarray(img)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [C, H, W] → [channels, H, W] (RGB → grey by luma, grey → RGB by repetition)."""
    c = image.shape[-3]
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return image.expand(*image.shape[:-3], 3, *image.shape[-2:]).contiguous()
    if c == 3 and channels == 1:
        grey = (image.float() * _LUMA).sum(dim=-3, keepdim=True)
        return grey.round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


def prepare_uint8(image: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 [C, H, W] (or [N, C, H, W]) → uint8 at the model's channel count and square size."""
    image = match_channels(image, spec.channels)
    if tuple(image.shape[-2:]) != (spec.image_size, spec.image_size):
        image = TF.resize(image, [spec.image_size, spec.image_size], antialias=True)
    return image


def normalize(batch_uint8: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 [N, C, H, W] → float, scaled to [0, 1] and normalised with the model's mean/std."""
    x = batch_uint8.float().div_(255.0)
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def as_nchw_uint8(images: np.ndarray) -> torch.Tensor:
    """An evaluation array (uint8 [N,H,W], [N,H,W,C] or [N,C,H,W]) → uint8 tensor [N, C, H, W]."""
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.ndim == 3:
        return tensor.unsqueeze(1)
    if tensor.ndim == 4 and tensor.shape[-1] in (1, 3) and tensor.shape[1] not in (1, 3):
        return tensor.permute(0, 3, 1, 2).contiguous()
    if tensor.ndim == 4:
        return tensor
    raise ValueError(f"images must have 3 or 4 dimensions, got shape {tuple(tensor.shape)}")
