"""One preprocessing path for every image source (web shards, .npz evaluation sets).

Images stay uint8 [C, H, W] until the last step so web samples and evaluation arrays are resized
and normalised by exactly the same code, with the model's own :class:`InputSpec`.
"""

from __future__ import annotations

import io
import platform

import numpy as np
import torch
from PIL import Image

from kd3.models.spec import InputSpec

# ITU-R 601 luma, as PIL's convert("L")
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def _grey_uint8(img: Image.Image) -> np.ndarray:
    """A single-channel image of any depth → uint8, scaled, never clipped: 16-bit (I;16*) maps
    0..65535 onto 0..255 (round(v / 257)); 32-bit integer or float images (modes I, F) have no
    declared range, so they are taken as 8-bit only when every value is in 0..255, else refused."""
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L"))
    values = np.asarray(img)
    if img.mode.startswith("I;16"):
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"mode {img.mode} image with values {values.min()}..{values.max()}: its range is not "
                         "declared, and kd3 does not clip or guess it; save it as an 8- or 16-bit image")
    return np.rint(values).astype(np.uint8)


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded bytes → uint8 [C, H, W] with C = 1 (grey) or 3 (RGB). Raises on undecodable bytes
    and on images whose values cannot be brought to 8 bits without clipping (see :func:`_grey_uint8`)."""
    with Image.open(io.BytesIO(data)) as img:
        grey = img.mode in ("1", "L", "F") or img.mode.startswith("I")
        array = _grey_uint8(img) if grey else np.asarray(img.convert("RGB"))
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


def _native_uint8_resize() -> bool:
    """Whether torch resizes uint8 directly on this CPU (its AVX2 / AVX-512 / ARM kernels) rather
    than through float: torchvision's rule, so both give the same pixels."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Images [..., C, H, W] (uint8 or float) → [..., C, size, size], bilinear with antialiasing:
    pixel for pixel what ``torchvision.transforms.v2.functional.resize(image, [size, size],
    antialias=True)`` gives (tests/unit/test_images.py compares them). Written against torch
    directly because importing torchvision costs every stage process ~2.5 s (it loads torch._dynamo)."""
    *lead, channels, height, width = image.shape
    if (height, width) == (size, size) or image.numel() == 0:
        return image
    x = image.reshape(-1, channels, height, width)
    if x.shape[0] == 1 and x.is_contiguous(memory_format=torch.channels_last) and x.numel() != x.stride(0):
        # one channels-last image (a decoded HWC array seen as CHW): give it a batch stride that
        # keeps it unambiguously channels-last, so interpolate's output stays channels-last as well
        x = x.as_strided(x.shape, (x.numel(), *x.stride()[1:]))
    native = x.dtype in (torch.float32, torch.float64) or (
        x.dtype == torch.uint8 and x.device.type == "cpu" and _native_uint8_resize())
    y = torch.nn.functional.interpolate(x if native else x.float(), size=[size, size], mode="bilinear",
                                        align_corners=False, antialias=True)
    if not native:  # through float32: integers rounded back, as torchvision does
        y = (y if image.dtype.is_floating_point else y.round_()).to(image.dtype)
    return y.reshape(*lead, channels, size, size)


def prepare_uint8(image: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 [C, H, W] (or [N, C, H, W]) → uint8 at the model's channel count and square size."""
    return resize_square(match_channels(image, spec.channels), spec.image_size)


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
    if tensor.ndim == 4 and tensor.shape[1] in (1, 3):
        return tensor
    if tensor.ndim == 4:
        raise ValueError(f"images of shape {tuple(tensor.shape)} have neither 1 nor 3 channels (on axis 1 or the "
                         "last axis); drop the alpha channel of RGBA images (images[..., :3]) or convert to grey")
    raise ValueError(f"images must have 3 or 4 dimensions, got shape {tuple(tensor.shape)}")
