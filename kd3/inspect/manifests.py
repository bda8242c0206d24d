"""Finding and streaming selection manifests.

Two kinds exist: the train stage's per-epoch KD³ manifests (``RUN/train/selection/epoch_XXX.parquet``,
with combined/student predictions, τ of each class, α and weights) and the select stage's one-shot
manifest (``RUN/select/manifest.parquet``, teacher predictions only). Readers ask for the columns
they need and get record batches, never a whole table.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd3 import layout
from kd3.errors import Kd3Error

#: the train stage's folder (``train.output``; variants such as "train_kd" live beside it)
TRAIN_DIR = layout.TRAIN
SELECT_MANIFEST = Path(layout.SELECT) / layout.SELECT_MANIFEST
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.parquet$")
#: record batch size for streaming reads: large enough for vectorised work, small in memory
BATCH_ROWS = 65_536
#: prediction families a manifest may carry, in the order a default is chosen
FAMILIES = ("combined", "teacher", "student")


@dataclass(frozen=True)
class ManifestRef:
    """One manifest file: a training epoch's selection or the select stage's."""

    path: Path
    #: the training epoch, None for the select stage's manifest
    epoch: Optional[int]

    @property
    def name(self) -> str:
        return "select" if self.epoch is None else f"epoch {self.epoch}"

    @property
    def short(self) -> str:
        """A column header for wide tables."""
        return "sel" if self.epoch is None else f"e{self.epoch}"


def selection_dir(run_dir: Path, train: str = TRAIN_DIR) -> Path:
    return layout.selection_dir(Path(run_dir) / train)


def epoch_manifests(run_dir: Path, train: str = TRAIN_DIR) -> list[ManifestRef]:
    """The train stage's per-epoch manifests, in epoch order (empty when there are none)."""
    folder = selection_dir(run_dir, train)
    refs = []
    for path in folder.glob("epoch_*.parquet") if folder.is_dir() else ():
        match = _EPOCH_FILE.match(path.name)
        if match:
            refs.append(ManifestRef(path, int(match.group(1))))
    return sorted(refs, key=lambda r: r.epoch)


def find_manifests(run_dir: Path, train: str = TRAIN_DIR) -> list[ManifestRef]:
    """Every manifest of a run: the select stage's first (if any), then the training epochs."""
    run_dir = Path(run_dir)
    refs = [ManifestRef(run_dir / SELECT_MANIFEST, None)] if (run_dir / SELECT_MANIFEST).is_file() else []
    refs += epoch_manifests(run_dir, train)
    if not refs:
        raise Kd3Error(f"no selection manifest in {run_dir}: expected {selection_dir(run_dir, train)}/epoch_*.parquet "
                       f"(kd3 train) or {run_dir / SELECT_MANIFEST} (kd3 select); run one of them first")
    return refs


def pick_manifests(run_dir: Path, epoch: Optional[str], train: str = TRAIN_DIR) -> list[ManifestRef]:
    """Resolve an ``--epoch`` value: None/"last" (the final selection), "select", "all" or a number."""
    refs = find_manifests(run_dir, train)
    epochs = [r for r in refs if r.epoch is not None]
    if epoch in (None, "last"):
        return [epochs[-1] if epochs else refs[0]]
    if epoch == "select":
        chosen = [r for r in refs if r.epoch is None]
    elif epoch == "all":
        chosen = epochs or refs
    else:
        try:
            number = int(epoch)
        except ValueError:
            raise Kd3Error(f"--epoch {epoch!r}: expected an epoch number, 'last', 'select' or 'all'") from None
        chosen = [r for r in epochs if r.epoch == number]
    if not chosen:
        have = ", ".join(str(r.epoch) for r in epochs) or f"none in {selection_dir(run_dir, train)}"
        hint = "; pass --train FOLDER when train.output is not 'train'" if not epochs else ""
        raise Kd3Error(f"--epoch {epoch}: no such manifest in {run_dir} (training epochs: {have}"
                       f"{'; select manifest present' if len(epochs) < len(refs) else ''}){hint}")
    return chosen


def ref_for_path(path: Path) -> ManifestRef:
    """A manifest given by file name (``--manifest``); the epoch comes from ``epoch_XXX.parquet``."""
    path = Path(path)
    if not path.is_file():
        raise Kd3Error(f"--manifest {path}: file not found")
    match = _EPOCH_FILE.match(path.name)
    return ManifestRef(path, int(match.group(1)) if match else None)


def run_dir_of(path: Path) -> Optional[Path]:
    """The run folder a manifest lives in, when it sits at its usual place; else None."""
    path = Path(path).resolve()
    for candidate in (path.parent.parent.parent, path.parent.parent):
        if (candidate / "score" / "meta.json").is_file() or (candidate / "download" / "shards").is_dir():
            return candidate
    return None


def class_names(run_dir: Optional[Path]) -> Optional[list[str]]:
    """The teacher's class names from ``RUN/score/meta.json``, or None when unavailable."""
    if run_dir is None:
        return None
    meta_path = Path(run_dir) / "score" / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        names = json.loads(meta_path.read_text())["teacher"]["class_names"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise Kd3Error(f"{meta_path}: no teacher.class_names; rerun `kd3 score --overwrite`") from None
    return [str(n) for n in names]


def columns_of(path: Path) -> list[str]:
    try:
        return list(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError) as exc:
        raise Kd3Error(f"{path}: not a readable parquet manifest ({exc})") from None


def prediction_columns(path: Path, by: Optional[str] = None) -> tuple[str, str]:
    """(label column, confidence column) of a manifest.

    Default: the combined prediction when present (KD³ epochs select on it), else the teacher's
    (the select stage selects on it). ``by`` forces a family and must exist.
    """
    names = set(columns_of(path))
    families = [by] if by else list(FAMILIES)
    for family in families:
        if f"{family}_label" in names and f"{family}_conf" in names:
            return f"{family}_label", f"{family}_conf"
    if by:
        raise Kd3Error(f"{path}: no {by}_label/{by}_conf columns for --by {by}; "
                       f"this manifest has: {', '.join(sorted(n[:-6] for n in names if n.endswith('_label')))}")
    raise Kd3Error(f"{path}: manifest has no label/confidence columns (expected combined_label/combined_conf "
                   "or teacher_label/teacher_conf)")


def require_columns(path: Path, needed: Sequence[str], why: str) -> None:
    missing = [c for c in needed if c not in set(columns_of(path))]
    if missing:
        raise Kd3Error(f"{path}: manifest lacks column(s) {', '.join(missing)} needed {why}")


def iter_batches(path: Path, columns: Sequence[str], batch_rows: Optional[int] = None) -> Iterator[pa.RecordBatch]:
    """Record batches holding only ``columns`` (a row group at a time, never the whole file)."""
    require_columns(path, columns, "here")
    with pq.ParquetFile(path) as handle:
        yield from handle.iter_batches(batch_size=batch_rows or BATCH_ROWS, columns=list(columns))


def uid_hashes(uids: pa.Array) -> np.ndarray:
    """64-bit hashes of uids: 8 bytes per sample instead of a ~40-byte string.

    Python's string hash (SipHash) is stable within a process, which is all churn and the
    ground-truth join need; two of a million uids collide with odds of about 1e-8, which would
    shift a count by one.
    """
    return np.fromiter((hash(u) for u in uids.to_pylist()), dtype=np.int64, count=len(uids))


def num_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def listing_fingerprint(paths: Sequence[Path]) -> str:
    """A cheap identity of a set of files (name, size, mtime): hashing gigabytes of manifests is not worth it."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
