"""The decoded-pixel cache: every scored pool image decoded once, kept as uint8 on disk.

At small image sizes the pipeline is bound by PNG decoding, and training decodes the pool again
every epoch (the per-epoch pool pass and the epoch's batches). The score stage decodes every image
anyway, so it writes the decoded pixels beside its cache: ``RUN/score/pixels.npy``, uint8
[N, C, H, W] in score-cache row order, memory-mapped by readers (3 KB per 32 px RGB image).

The cache holds the output of :func:`kd3.data.images.decode_image`, before any resize, so every
model's preprocessing (``prepare_uint8`` with its own InputSpec) gives exactly the tensors the
decode path gives: a run with the cache is bit-identical to one without. Grey images (1 channel)
and colour images (3) share the array, padded to the most channels, with each row's channel count
in ``RUN/score/pixel_channels.npy``. The cache exists only when every decoded image has the same
height and width (img2dataset's resize modes other than ``no`` guarantee it) and the images are
small enough (``score.pixel_cache_max_side``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from kd3 import layout


@dataclass
class PoolPixels:
    """Read side: decoded uint8 images by score-cache row, and the rows of each shard in file order."""

    pixels: np.ndarray  # memory-mapped uint8 [N, C, H, W], score-cache row order
    channels: np.ndarray  # [N] each row's own channel count (rows with fewer are zero-padded)
    uids: np.ndarray  # [N] the uid of each cached row
    rows_by_shard: dict[str, np.ndarray]  # shard stem → its rows, ascending (= key order = tar order)

    @classmethod
    def open(cls, run_dir: Path, frame: pd.DataFrame) -> Optional["PoolPixels"]:
        """The score stage's pixel cache of ``run_dir`` for the score cache ``frame`` (uid and shard
        columns); None without one."""
        path = Path(run_dir) / layout.SCORE / layout.PIXEL_CACHE
        channels_path = Path(run_dir) / layout.SCORE / layout.PIXEL_CHANNELS
        if not (path.is_file() and channels_path.is_file()):
            return None
        pixels, channels = np.load(path, mmap_mode="r"), np.load(channels_path)
        if not pixels.shape[0] == len(channels) == len(frame):
            return None  # not the cache of this score output: decode from the shards instead
        shard = frame["shard"].to_numpy()
        rows_by_shard = {str(s): np.flatnonzero(shard == s) for s in pd.unique(shard)}
        return cls(pixels=pixels, channels=channels, uids=frame["uid"].to_numpy(), rows_by_shard=rows_by_shard)

    def image(self, row: int) -> np.ndarray:
        """The decoded image of cache row ``row``, uint8 [C, H, W] with its own channel count."""
        return np.array(self.pixels[row, :self.channels[row]])

    def images(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The decoded images of cache rows ``rows`` in one read: uint8 [n, C_max, H, W] (rows with
        fewer channels zero-padded) and each row's own channel count [n]."""
        return np.asarray(self.pixels[rows]), self.channels[rows]

    @classmethod
    def for_run(cls, run_dir: Path) -> Optional["PoolPixels"]:
        """:meth:`open` for a stage that does not load the whole score cache."""
        cache = layout.score_cache(run_dir)
        return cls.open(run_dir, pd.read_parquet(cache, columns=["uid", "shard"])) if cache.is_file() else None


def stack_padded(images: list[np.ndarray], max_side: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Decoded uint8 [C, H, W] images → (uint8 [n, C_max, H, W] zero-padded, channels [n]); None when
    their heights and widths differ or exceed ``max_side`` (no cache then)."""
    sizes = {image.shape[1:] for image in images}
    if len(sizes) != 1 or max(next(iter(sizes))) > max_side:
        return None
    channels = np.array([image.shape[0] for image in images], dtype=np.uint8)
    stacked = np.zeros((len(images), int(channels.max()), *next(iter(sizes))), dtype=np.uint8)
    for i, image in enumerate(images):
        stacked[i, :image.shape[0]] = image
    return stacked, channels
