"""kd3's antialiased resize against torchvision's, bit for bit (kd3 resizes without importing
torchvision, which costs each stage process ~2.5 s of start-up: tests/unit/test_startup.py)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from kd3.data import images
from kd3.data.images import resize_square


def _cases():
    g = torch.Generator().manual_seed(0)
    hwc = torch.randint(0, 256, (28, 21, 3), dtype=torch.uint8, generator=g)
    yield "uint8 grey, down", torch.randint(0, 256, (1, 37, 29), dtype=torch.uint8, generator=g), 16
    yield "uint8 grey, up", torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8, generator=g), 32
    yield "uint8 RGB from HWC (channels-last view)", hwc.permute(2, 0, 1), 32
    yield "uint8 RGB from HWC, down", hwc.permute(2, 0, 1), 8
    yield "uint8 batch", torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8, generator=g), 32
    yield "uint8 batch, channels-last", torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8,
                                                      generator=g).contiguous(memory_format=torch.channels_last), 16
    yield "float grey", torch.rand(1, 1, 28, 28, generator=g), 13
    yield "float RGB", torch.rand(3, 33, 17, generator=g) * 255, 64
    yield "float64", torch.rand(2, 3, 9, 9, generator=g, dtype=torch.float64), 5
    yield "same size", torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g), 16


@pytest.mark.parametrize("name, image, size", list(_cases()), ids=[c[0] for c in _cases()])
def test_resize_square_matches_torchvision_pixel_for_pixel(name, image, size):
    ours = resize_square(image, size)
    theirs = TF.resize(image, [size, size], antialias=True)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs), (name, (ours.double() - theirs.double()).abs().max())


def test_resize_square_through_float_when_the_cpu_has_no_uint8_kernel(monkeypatch):
    # torchvision's own fallback on CPUs without AVX2: float32, rounded back to uint8
    image = torch.randint(0, 256, (3, 30, 22), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(images, "_native_uint8_resize", lambda: False)
    expected = torch.nn.functional.interpolate(image[None].float(), size=[16, 16], mode="bilinear",
                                               align_corners=False, antialias=True)[0].round().to(torch.uint8)
    assert torch.equal(resize_square(image, 16), expected)
