"""Labelled evaluation sets: an .npz array file, an image folder, or webdataset shards.

Every set yields batches ``(images, labels)``: images are a uint8 tensor [B, C, H, W] (.npz) or a
list of uint8 [C, H, W] tensors of any size (folders, shards) that each model prepares with its
own :class:`InputSpec` (:func:`kd3.data.images.prepare_uint8`), exactly as web samples are;
labels are int64 [B] indices into the teacher's ``class_names``.

- ``npz``: arrays ``images`` (uint8 [N,H,W], [N,H,W,C] or [N,C,H,W]) and ``labels``.
- ``folder``: ``<path>/<class name>/**/<image>``; folder names must be teacher class names.
- ``webdataset``: a .tar, a folder of .tar files, a glob (``shards/*.tar``) or a brace pattern
  (``shards/{00000..00009}.tar``); the label comes from a ``cls`` / ``label`` / ``class`` field
  or a ``json`` field of that name. Integers are class indices, other text is a class name.
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from kd3.data.images import as_nchw_uint8, decode_image
from kd3.errors import Kd3Error
from kd3.runs import file_fingerprint

FORMATS = ("npz", "folder", "webdataset")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
#: label fields tried in order when ``label_key`` is None (then the same names inside ``json``)
LABEL_FIELDS = ("cls", "label", "class")

Images = Union[torch.Tensor, list[torch.Tensor]]


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[{")


def detect_format(path: Path, fmt: str = "auto") -> str:
    """``fmt`` unless "auto": .npz → npz; .tar, a glob/brace pattern or a folder holding .tar files
    → webdataset; any other folder → folder. A path that does not exist is a Kd3Error."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise Kd3Error(f"unknown evaluation set format {fmt!r}; valid choices: auto, {', '.join(FORMATS)}")
        return fmt
    if _is_pattern(str(path)):
        return "webdataset"
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        if path.suffix.lower() == ".tar":
            return "webdataset"
        raise Kd3Error(f"{path}: not an evaluation set (expected an .npz, a .tar shard or a folder)")
    if path.is_dir():
        return "webdataset" if any(path.glob("*.tar")) else "folder"
    raise Kd3Error(f"evaluation set not found: {path}")


def shard_paths(path: Path) -> list[Path]:
    """The .tar shards a webdataset path names (file, folder, glob or brace pattern), sorted."""
    text = str(path)
    if _is_pattern(text):
        import braceexpand

        found = sorted({Path(p) for pattern in braceexpand.braceexpand(text) for p in glob.glob(pattern)})
    elif path.is_dir():
        found = sorted(path.glob("*.tar"))
    else:
        found = [path] if path.is_file() else []
    if not found:
        raise Kd3Error(f"{path}: no webdataset shards (.tar) found")
    return found


def check_tar(path: Path) -> None:
    """A Kd3Error naming ``path`` when it is not a complete tar file (truncated, corrupt). Reads the
    member headers only (tarfile seeks over the data), so it is cheap before any work."""
    import tarfile

    try:
        with tarfile.open(path, "r:") as tar:
            for _ in tar:
                pass
            # cut at a member boundary, a tar reads as complete; only the end-of-archive blocks say otherwise
            if path.stat().st_size < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("no end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise Kd3Error(f"{path}: not a complete tar file ({exc}); it is truncated or corrupt: copy or "
                       "create it again") from None


def fingerprint(path: Path, fmt: str = "auto") -> str:
    """Identify an evaluation set for resume checks: the file's content hash (.npz), else the names,
    sizes and modification times of its files (hashing whole image folders would be slow)."""
    kind = detect_format(path, fmt)
    if kind == "npz":
        return file_fingerprint(path)
    files = shard_paths(path) if kind == "webdataset" else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for p in files:
        st = p.stat()
        digest.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def class_folders(path: Path, class_names: Sequence[str]) -> list[tuple[Path, int]]:
    """(sub-folder, class index) for every class-named sub-folder; unknown names are a Kd3Error."""
    if not path.is_dir():
        raise Kd3Error(f"image-folder evaluation set not found: {path}")
    index = {name: i for i, name in enumerate(class_names)}
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise Kd3Error(f"{path}: an image-folder evaluation set needs one sub-folder per class, found none")
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        shown = ", ".join(list(class_names)[:10]) + (" …" if len(class_names) > 10 else "")
        raise Kd3Error(f"{path}: class folder(s) {unknown[:5]} are not teacher classes ({shown}); "
                       "rename or remove them")
    return [(p, index[p.name]) for p in folders]


class EvalSet:
    """One evaluation set: iterate :meth:`batches`; ``skipped`` counts undecodable images."""

    def __init__(self, name: str, path: Path, kind: str):
        self.name, self.path, self.kind = name, path, kind
        self.skipped = 0
        #: number of images when known before reading them (for progress lines); None for shards
        self.size: Optional[int] = None

    def batches(self, batch_size: int) -> Iterator[tuple[Images, torch.Tensor]]:
        raise NotImplementedError


class NpzEvalSet(EvalSet):
    def __init__(self, name: str, path: Path, num_classes: int):
        super().__init__(name, path, "npz")
        try:
            with np.load(path) as data:
                images, labels = data["images"], data["labels"]
        except KeyError as exc:
            raise Kd3Error(f"{path}: evaluation .npz needs arrays 'images' and 'labels' (missing {exc})") from None
        except Exception as exc:
            raise Kd3Error(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None
        try:
            self.images = as_nchw_uint8(images)
        except ValueError as exc:
            raise Kd3Error(f"{path}: {exc}") from None
        if len(labels) != len(self.images):
            raise Kd3Error(f"{path}: {len(self.images)} images but {len(labels)} labels")
        labels = np.asarray(labels)
        if labels.dtype == bool or labels.dtype.kind not in "iu":
            shown = ", ".join(str(v) for v in labels.reshape(-1)[:3])
            raise Kd3Error(f"{path}: labels must be integer class indices, got dtype {labels.dtype} ({shown} …); "
                           "kd3 never rounds or truncates labels: store them as integers")
        if labels.ndim != 1:
            raise Kd3Error(f"{path}: labels must be one class index per image (shape [N]), got shape {labels.shape}")
        self.labels = torch.from_numpy(labels.astype(np.int64))
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= num_classes):
            raise Kd3Error(f"{path}: labels outside 0..{num_classes - 1}")
        self.size = len(self.labels)

    def batches(self, batch_size: int) -> Iterator[tuple[Images, torch.Tensor]]:
        for start in range(0, len(self.labels), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


class FolderEvalSet(EvalSet):
    def __init__(self, name: str, path: Path, class_names: Sequence[str]):
        super().__init__(name, path, "folder")
        self.files: list[tuple[Path, int]] = []
        for folder, label in class_folders(path, class_names):
            self.files += [(p, label) for p in sorted(folder.rglob("*"))
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise Kd3Error(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
        self.size = len(self.files)

    def batches(self, batch_size: int) -> Iterator[tuple[Images, torch.Tensor]]:
        yield from _decoded_batches(self, ((file.read_bytes(), label) for file, label in self.files), batch_size)


def _decoded_batches(owner, pairs: Iterable[tuple[bytes, int]], batch_size: int) -> Iterator[tuple[Images, torch.Tensor]]:
    """(encoded bytes, label) pairs → batches of decoded images; undecodable ones counted in owner.skipped."""
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for data, label in pairs:
        try:
            images.append(decode_image(data))
        except Exception:  # PIL raises many types for corrupt files
            owner.skipped += 1
            continue
        labels.append(label)
        if len(images) == batch_size:
            yield images, torch.tensor(labels, dtype=torch.int64)
            images, labels = [], []
    if images:
        yield images, torch.tensor(labels, dtype=torch.int64)


def parse_label(value: object, class_names: Sequence[str], where: str) -> int:
    """A label field → class index: an int (or integer text) is an index, other text a class name."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            if text in class_names:
                return list(class_names).index(text)
            raise Kd3Error(f"{where}: label {text!r} is not a teacher class (e.g. {', '.join(list(class_names)[:5])})"
                           ) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Kd3Error(f"{where}: label {value!r} is neither a class index nor a class name")
    if not 0 <= value < len(class_names):
        raise Kd3Error(f"{where}: class index {value} outside 0..{len(class_names) - 1}")
    return value


class WebDatasetEvalSet(EvalSet):
    def __init__(self, name: str, path: Path, class_names: Sequence[str], label_key: Optional[str] = None):
        super().__init__(name, path, "webdataset")
        self.shards = shard_paths(path)
        self.class_names = list(class_names)
        self.label_key = label_key

    def _label(self, sample: dict, where: str) -> int:
        keys = [self.label_key] if self.label_key else [*LABEL_FIELDS, *(f"json.{k}" for k in LABEL_FIELDS)]
        meta = None
        for key in keys:
            if key.startswith("json."):
                if meta is None:
                    meta = json.loads(sample["json"]) if "json" in sample else {}
                if key[5:] in meta:
                    return parse_label(meta[key[5:]], self.class_names, where)
            elif key in sample:
                return parse_label(sample[key], self.class_names, where)
        raise Kd3Error(f"{where}: no label field ({', '.join(keys)}); set the dataset's label_key")

    def batches(self, batch_size: int) -> Iterator[tuple[Images, torch.Tensor]]:
        import webdataset as wds

        dataset = wds.WebDataset([str(p) for p in self.shards], shardshuffle=False, nodesplitter=None,
                                 workersplitter=None, empty_check=False)
        def labelled() -> Iterator[tuple[bytes, int]]:
            for sample in dataset:
                image_key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
                if image_key is None:
                    continue  # not an image sample
                where = f"{sample.get('__url__', self.path)}:{sample.get('__key__', '?')}"
                yield sample[image_key], self._label(sample, where)

        yield from _decoded_batches(self, labelled(), batch_size)


def open_eval_set(name: str, path: Path, class_names: Sequence[str], fmt: str = "auto",
                  label_key: Optional[str] = None) -> EvalSet:
    """The evaluation set at ``path`` (see the module docstring for the three formats)."""
    kind = detect_format(Path(path), fmt)
    if kind == "npz":
        return NpzEvalSet(name, Path(path), len(class_names))
    if kind == "folder":
        return FolderEvalSet(name, Path(path), class_names)
    return WebDatasetEvalSet(name, Path(path), class_names, label_key)
