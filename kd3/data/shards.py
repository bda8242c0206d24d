"""Reading the download stage's webdataset shards, keyed by uid.

img2dataset writes, per shard, ``NNNNN.tar`` (successful samples: image + json with our uid) and
``NNNNN.parquet`` (every input row with ``status`` and ``error_message``). Samples inside a tar are
in completion order, so everything joins on uid, never on position.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import pandas as pd
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kd3 import layout
from kd3.data.images import decode_image, match_channels, prepare_uint8
from kd3.data.pixel_cache import PoolPixels
from kd3.data.tars import TarFormatError, TarReadStats, iter_samples
from kd3.errors import Kd3Error
from kd3.models.spec import InputSpec
from kd3.runs import check_outputs, file_fingerprint, require_complete

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def shards_dir(download_dir: Path) -> Path:
    return Path(download_dir) / "shards"


def list_shards(download_dir: Path) -> list[Path]:
    shards = sorted(shards_dir(download_dir).glob("*.tar"))
    if not shards:
        raise Kd3Error(f"no webdataset shards (*.tar) in {shards_dir(download_dir)}; run `kd3 download` first")
    return shards


def read_download_index(download_dir: Path, columns: Optional[list[str]] = None) -> pd.DataFrame:
    """Every URL of the download (successes and failures), with its shard, from the per-shard parquet."""
    frames = []
    for parquet in sorted(shards_dir(download_dir).glob("*.parquet")):
        frame = pd.read_parquet(parquet, columns=columns)
        frame["shard"] = parquet.stem
        frames.append(frame)
    if not frames:
        raise Kd3Error(f"no per-shard parquet files in {shards_dir(download_dir)}; run `kd3 download` first")
    return pd.concat(frames, ignore_index=True)


def shard_fingerprints(download_dir: Path) -> dict[str, str]:
    """Per shard: the tar's size and the content hashes of its per-shard parquet and stats json (the
    tars are not hashed: they are the bulk of a download). Recorded by download in meta.json
    ``outputs`` and compared by every stage that reads the shards (:func:`check_shards_unchanged`)."""
    folder = shards_dir(download_dir)
    stems = sorted({p.name.split(".")[0].removesuffix("_stats") for p in folder.glob("*")
                    if p.suffix in (".tar", ".parquet", ".json")})
    found = {}
    for stem in stems:
        tar, parquet, stats = folder / f"{stem}.tar", folder / f"{stem}.parquet", folder / f"{stem}_stats.json"
        found[stem] = " ".join([f"tar {tar.stat().st_size if tar.is_file() else 'missing'}",
                                f"parquet {file_fingerprint(parquet) if parquet.is_file() else 'missing'}",
                                f"stats {file_fingerprint(stats) if stats.is_file() else 'missing'}"])
    return found


def check_shards_unchanged(run_dir: Path, needed_by: str) -> None:
    """The download stage of ``run_dir`` finished, and its shards are the ones it wrote."""
    require_complete(Path(run_dir), layout.DOWNLOAD, needed_by)
    check_outputs(run_dir, layout.DOWNLOAD, {"shards": shard_fingerprints(Path(run_dir) / layout.DOWNLOAD)}, needed_by)


class _SkipCounter:
    """Rate-limited logging of undecodable samples (the first, then every 100th)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, where: str, reason: str) -> None:
        self.count += 1
        if self.count == 1 or self.count % 100 == 0:
            log.warning("skipping undecodable sample %s (%s); %d skipped so far", where, reason, self.count)


def iter_raw_samples(shard_paths: list[Path], stats: Optional[TarReadStats] = None) -> Iterator[dict[str, Any]]:
    """(uid, url, key, shard, image bytes) per sample, in file order, tolerating odd entries.

    Members whose names are not plain ``key.ext`` are skipped (recorded in ``stats``); a corrupt or
    truncated shard is logged and its remaining samples skipped, as webdataset's
    ``warn_and_continue`` did before kd3 read the shards itself (:mod:`kd3.data.tars`)."""
    for shard in shard_paths:
        try:
            for key, files in iter_samples(shard, stats=stats):
                image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
                if image_ext is None or "json" not in files:
                    continue  # samples without an image
                meta = json.loads(files["json"])
                yield {"uid": meta.get("uid") or key, "url": meta.get("url", ""), "key": key,
                       "shard": Path(shard).stem, "bytes": files[image_ext]}
        except TarFormatError as exc:
            log.warning("%s; skipping the rest of this shard", exc)
    if stats is not None and stats.refused_names:
        log.warning("skipped %d tar member(s) whose names are not plain sample keys (first: %r)",
                    len(stats.refused_names), stats.refused_names[0])


class ShardImages(IterableDataset):
    """Decoded, resized uint8 images from shards, optionally restricted to a uid → row mapping.

    Yields ``{"row": int, "uid": str, "image": uint8 [C, H, W]}`` where ``row`` indexes the score
    cache (or -1 without a mapping), plus ``"teacher_image"`` prepared for ``teacher_spec`` when one
    is given (teacher and student views of the same decoded image, each at its model's size), and
    ``"decoded"`` (the image before preparation) with ``keep_decoded``. With ``pixels`` (the score
    stage's decoded-pixel cache) and a mapping, images come from the cache instead of being decoded,
    in the same order, so the items are identical. With ``shuffle=True`` the shard order and a buffer of
    ``shuffle_buffer`` samples are shuffled from ``seed`` and ``epoch``, so an epoch's order is
    reproducible (with num_workers=0 exactly; with workers per worker).
    """

    def __init__(self, shard_paths: list[Path], spec: InputSpec, uid_to_row: Optional[Mapping[str, int]] = None,
                 shuffle: bool = False, shuffle_buffer: int = 2048, seed: int = 0, epoch: int = 0,
                 teacher_spec: Optional[InputSpec] = None, pixels: Optional[PoolPixels] = None,
                 keep_decoded: bool = False):
        super().__init__()
        self.pixels = pixels if uid_to_row is not None else None
        self.keep_decoded = keep_decoded
        self.shard_paths = list(shard_paths)
        self.spec = spec
        self.teacher_spec = teacher_spec
        self.uid_to_row = uid_to_row
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch
        self.skipped = _SkipCounter()
        #: items carry only the decoded image, prepared a batch at a time by :class:`BatchCollate`
        self.defer_prepare = False

    def _my_shards(self) -> tuple[list[Path], random.Random]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}-{self.epoch}-{worker}")
        shards = list(self.shard_paths)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(shards)
        return shards[worker::n_workers], rng

    def _item(self, row: int, uid: str, decoded: torch.Tensor) -> dict[str, Any]:
        if self.defer_prepare:  # image_loader's collation prepares the whole batch at once
            return {"row": row, "uid": uid, "decoded": decoded}
        item = {"row": row, "uid": uid, "image": prepare_uint8(decoded, self.spec)}
        if self.teacher_spec is not None:
            item["teacher_image"] = prepare_uint8(decoded, self.teacher_spec)
        if self.keep_decoded:
            item["decoded"] = decoded
        return item

    def _cached_refs(self, shards: list[Path]) -> Iterator[tuple[int, str, int]]:
        """(row, uid, pixel-cache row) of the mapped uids of ``shards``, in the order decoding would give them."""
        cache = self.pixels
        for shard in shards:
            for cache_row in cache.rows_by_shard.get(shard.stem, ()):
                uid = cache.uids[cache_row]
                row = self.uid_to_row.get(uid)
                if row is not None:
                    yield row, uid, int(cache_row)

    def _decoded(self, shards: list[Path]) -> Iterator[dict[str, Any]]:
        if self.pixels is not None:
            for row, uid, cache_row in self._cached_refs(shards):
                yield self._item(row, uid, torch.from_numpy(self.pixels.image(cache_row)))
            return
        for sample in iter_raw_samples(shards):
            row = -1
            if self.uid_to_row is not None:
                row = self.uid_to_row.get(sample["uid"], None)
                if row is None:
                    continue
            try:
                decoded = decode_image(sample["bytes"])
            except Exception as exc:  # PIL raises many types for corrupt files
                self.skipped(f"{sample['shard']}/{sample['key']}", type(exc).__name__)
                continue
            yield self._item(row, sample["uid"], decoded)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shards, rng = self._my_shards()
        items = self._decoded(shards)
        yield from (_buffer_shuffled(items, rng, self.shuffle_buffer) if self.shuffle else items)

    def cached_order(self) -> list[tuple[int, str, int]]:
        """(row, uid, pixel-cache row) in exactly the order :meth:`__iter__` yields its items from the
        pixel cache in one process (the same shard order and the same buffer shuffle, on references)."""
        shards, rng = self._my_shards()
        refs = self._cached_refs(shards)
        return list(_buffer_shuffled(refs, rng, self.shuffle_buffer) if self.shuffle else refs)


def _buffer_shuffled(items: Iterator[Any], rng: random.Random, size: int) -> Iterator[Any]:
    """A streaming shuffle: a buffer of ``size`` items, each new item swapped with a random one."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class CachedBatches:
    """The batches a one-process DataLoader collates from a :class:`ShardImages` over the pixel
    cache — same rows, uids and images, in the same order — with each batch's images read from the
    memory-mapped cache and resized in one call instead of one image at a time (batched resizing is
    bit-identical to per-image resizing; tests/unit/test_pixel_cache.py compares the batches)."""

    def __init__(self, dataset: ShardImages, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        order = ds.cached_order()
        for start in range(0, len(order), self.batch_size):
            rows, uids, cache_rows = zip(*order[start:start + self.batch_size])
            data, channels = ds.pixels.images(np.asarray(cache_rows))
            batch = {"row": torch.tensor(rows), "uid": list(uids), "image": _prepare_batch(data, channels, ds.spec)}
            if ds.teacher_spec is not None:
                batch["teacher_image"] = _prepare_batch(data, channels, ds.teacher_spec)
            yield batch


def _prepare_batch(data: np.ndarray, channels: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """Padded cache images [n, C_max, H, W] with their channel counts → prepared for ``spec``: the
    channel conversion per group of equal counts, then one resize for the whole batch (the same
    pixels as :func:`prepare_uint8` image by image)."""
    matched = torch.empty((len(data), spec.channels, *data.shape[2:]), dtype=torch.uint8)
    for count in np.unique(channels):
        group = np.flatnonzero(channels == count)
        matched[group] = match_channels(torch.from_numpy(data[group, :count]), spec.channels)
    return prepare_uint8(matched, spec)


def _prepare_list(decoded: list[torch.Tensor], spec: InputSpec) -> torch.Tensor:
    """Decoded images of one batch → prepared for ``spec``, in bulk when they share a height and width."""
    if len({tuple(image.shape[1:]) for image in decoded}) != 1:
        return torch.stack([prepare_uint8(image, spec) for image in decoded])
    counts = np.array([image.shape[0] for image in decoded])
    padded = np.zeros((len(decoded), int(counts.max()), *decoded[0].shape[1:]), np.uint8)
    for i, image in enumerate(decoded):
        padded[i, :image.shape[0]] = image.numpy()
    return _prepare_batch(padded, counts, spec)


class BatchCollate:
    """DataLoader collation of :class:`ShardImages` items: the default for rows and uids, images
    prepared (channels, resize) a batch at a time when the items were deferred, ``decoded`` images
    (of any sizes) kept as a list when asked. A class, so that worker processes can pickle it."""

    def __init__(self, dataset: ShardImages):
        self.spec, self.teacher_spec = dataset.spec, dataset.teacher_spec
        self.keep_decoded, self.deferred = dataset.keep_decoded, dataset.defer_prepare

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        decoded = [item.pop("decoded") for item in items] if items and "decoded" in items[0] else None
        batch = torch.utils.data.default_collate(items)
        if self.deferred and decoded is not None:
            batch["image"] = _prepare_list(decoded, self.spec)
            if self.teacher_spec is not None:
                batch["teacher_image"] = _prepare_list(decoded, self.teacher_spec)
        if self.keep_decoded and decoded is not None:
            batch["decoded"] = decoded
        return batch


@dataclass(frozen=True)
class LoaderOptions:
    """How a DataLoader decodes: worker processes and their options, pinned batches (for CUDA)."""

    num_workers: int = 0
    pin_memory: bool = False
    #: keep the workers between passes over the loader (torch's ``persistent_workers``)
    persistent_workers: bool = False
    #: batches each worker prepares ahead; None: torch's default
    prefetch_factor: Optional[int] = None

    def dataloader_kwargs(self) -> dict[str, Any]:
        """The DataLoader's keyword arguments; the worker options only with workers (torch refuses
        them otherwise; the config refuses them first, kd3.config.LoaderSection)."""
        kwargs: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs


def image_loader(dataset: ShardImages, batch_size: int, workers: Union[int, LoaderOptions]) -> Iterable[dict[str, Any]]:
    """Batches of ``dataset``: read in bulk from the pixel cache when it has one (workers would add
    nothing there; the order is then the one-process order), else decoded by a DataLoader (``workers``:
    a worker count, or the full :class:`LoaderOptions`) and prepared a batch at a time."""
    if dataset.pixels is not None and not dataset.keep_decoded:
        return CachedBatches(dataset, batch_size)
    options = workers if isinstance(workers, LoaderOptions) else LoaderOptions(num_workers=workers)
    dataset.defer_prepare = True
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=BatchCollate(dataset),
                                       **options.dataloader_kwargs())


def canonicalize_shard(path: Path) -> int:
    """Rewrite a tar shard with its samples sorted by key (atomically); return the sample count.

    img2dataset writes samples in download-completion order, which differs between two downloads
    of the same URL list; sorting makes a download's shards, and so every later stage's data order,
    depend only on what was downloaded. Members are written as plain GNU headers (whole-second
    mtime, no PAX record): half the header blocks to parse on every read, and half the size of
    small-image shards. Idempotent; streams member by
    member (no whole-shard load).
    """
    import copy
    import tarfile

    from kd3.runs import atomic_path

    path = Path(path)
    with tarfile.open(path, "r") as src:
        members = [m for m in src.getmembers() if m.isfile()]
        # group by sample key (file name up to the first dot, as webdataset does)
        order = sorted(range(len(members)), key=lambda i: (members[i].name.split(".", 1)[0], members[i].name))
        plain = all(not m.pax_headers for m in members)
        if order == list(range(len(members))) and plain:
            return len({m.name.split(".", 1)[0] for m in members})
        with atomic_path(path) as tmp:
            with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as dst:
                for i in order:
                    member = copy.copy(members[i])
                    member.pax_headers, member.mtime = {}, int(member.mtime)
                    dst.addfile(member, src.extractfile(members[i]))
    return len({m.name.split(".", 1)[0] for m in members})
