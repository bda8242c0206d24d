"""Ground truth kept beside the pool, joined on uid: which samples are in-domain and their true class.

The embedded demo's URL list (copied by the download stage to ``RUN/download/url_list.parquet``)
carries ``source`` ("mnist" = in-domain, "natural" = distractor, "broken") and ``demo_label`` (the
true digit of an MNIST file, -1 otherwise). No method ever sees these columns; ``kd3 inspect`` uses
them to say how pure each selection is, how much of the in-domain data it found (overall and per
true class), and whether one pseudo-class absorbs the distractors. A crawl of one's own has no
such columns: then inspect says so in one line and leaves those tables out.

The lookup holds, per URL, a 64-bit uid hash (sorted), an in-domain flag and an int32 true label
(13 bytes a URL), read a record batch at a time; manifests are joined a batch at a time by binary
search, so no uid strings are kept and no manifest is loaded whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd3 import layout
from kd3.inspect.manifests import columns_of, iter_batches, uid_hashes


@dataclass(frozen=True)
class TruthSettings:
    """Where the ground truth is and when to warn (the ``inspect`` config section's keys)."""

    #: URL-list column saying where a sample comes from; None: no ground truth
    column: Optional[str] = "source"
    #: the value of ``column`` (compared as text) that marks an in-domain sample
    in_domain_value: str = "mnist"
    #: URL-list column with the true class of in-domain samples (index or class name); None: no per-class recall
    label_column: Optional[str] = "demo_label"
    #: warn when one class holds more than this share of the selected distractors (or of the selection)
    warn_share: float = 0.5
    #: ... and that many samples are at least this many (a handful of selected distractors says little)
    warn_min_samples: int = 10
    #: warn when the final selection keeps at least this share of the pool (selection hardly filters)
    warn_keep_share: float = 0.95


DEFAULT_TRUTH = TruthSettings()


def url_list_path(run_dir: Path) -> Path:
    return Path(run_dir) / layout.DOWNLOAD / layout.URL_LIST


@dataclass
class GroundTruth:
    """The URL list's ground truth as sorted uid hashes with aligned flags and labels."""

    path: str
    column: str
    in_domain_value: str
    #: the true-label column, None when absent or switched off
    label_column: Optional[str]
    hashes: np.ndarray
    in_domain: np.ndarray
    #: true class index per URL (-1: none or unknown); None without a label column
    true_label: Optional[np.ndarray]
    #: classes the true labels range over (at least the teacher's)
    num_classes: int

    @property
    def urls(self) -> int:
        return len(self.hashes)

    @property
    def in_domain_urls(self) -> int:
        return int(self.in_domain.sum())

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(found in the URL list, in-domain, true class or -1) for each uid hash."""
        if not len(self.hashes):
            none = np.zeros(len(hashes), bool)
            return none, none, (np.full(len(hashes), -1, np.int64) if self.true_label is not None else None)
        pos = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        found = self.hashes[pos] == hashes
        in_domain = found & self.in_domain[pos]
        true = None
        if self.true_label is not None:
            true = np.where(in_domain, self.true_label[pos], -1).astype(np.int64)
        return found, in_domain, true

    def info(self) -> dict:
        return {"available": True, "path": self.path, "column": self.column, "in_domain_value": self.in_domain_value,
                "true_label_column": self.label_column, "urls": self.urls, "in_domain_urls": self.in_domain_urls}


def _in_domain(column: pa.Array, value: str) -> np.ndarray:
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    text = column if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) \
        else pc.cast(column, pa.string())
    return pc.fill_null(pc.equal(text, value), False).to_numpy(zero_copy_only=False).astype(bool)


def _true_labels(column: pa.Array, names: Optional[Sequence[str]]) -> np.ndarray:
    """Class indices of a label column: integers as they are, class names through ``names``; else -1."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = pc.fill_null(column.cast(pa.float64()), -1.0).to_numpy(zero_copy_only=False)
        values = np.where(np.isfinite(values), values, -1)
        return values.astype(np.int64)
    index = {str(n): k for k, n in enumerate(names or [])}
    return np.fromiter((index.get(str(v), -1) if v is not None else -1 for v in column.to_pylist()),
                       dtype=np.int64, count=len(column))


def load_ground_truth(run_dir: Optional[Path], settings: TruthSettings = DEFAULT_TRUTH,
                      class_names: Optional[Sequence[str]] = None) -> tuple[Optional[GroundTruth], Optional[str]]:
    """(ground truth or None, a one-line note or None).

    The note says why there is no ground truth (no URL list, no such column) or what is missing
    from it (no true-label column); it is None when everything asked for is there, and when
    ground truth is switched off (``settings.column`` None).
    """
    if settings.column is None or run_dir is None:
        return None, None
    path = url_list_path(run_dir)
    key = "inspect.ground_truth_column"
    if not path.is_file():
        return None, f"ground truth: no {path} (run kd3 download); purity and recall tables skipped"
    names = set(columns_of(path))
    if "uid" not in names:
        return None, f"ground truth: {path} has no uid column; purity and recall tables skipped"
    if settings.column not in names:
        return None, (f"ground truth: the URL list ({path}) has no {settings.column!r} column (a crawl of your own "
                      f"has none; {key}); purity and recall tables skipped")
    label_column = settings.label_column if settings.label_column in names else None
    notes = []
    if settings.label_column is not None and label_column is None:
        notes.append(f"the URL list ({path}) has no {settings.label_column!r} column (inspect.true_label_column); "
                     "per-class recall skipped")
    hashes, flags, labels = [], [], []
    for batch in iter_batches(path, ["uid", settings.column] + ([label_column] if label_column else [])):
        hashes.append(uid_hashes(batch.column("uid")))
        flags.append(_in_domain(batch.column(settings.column), settings.in_domain_value))
        if label_column:
            labels.append(_true_labels(batch.column(label_column), class_names).astype(np.int32))
    all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
    order = np.argsort(all_hashes, kind="stable")
    in_domain = (np.concatenate(flags) if flags else np.zeros(0, bool))[order]
    true = None
    num_classes = len(class_names or [])
    if label_column:
        true = (np.concatenate(labels) if labels else np.zeros(0, np.int32))[order]
        true = np.where(in_domain, true, -1).astype(np.int32)
        num_classes = max(num_classes, int(true.max(initial=-1)) + 1)
    truth = GroundTruth(str(path), settings.column, settings.in_domain_value, label_column, all_hashes[order],
                        in_domain, true, num_classes)
    if not truth.in_domain_urls:
        notes.append(f"no row of {path} has {settings.column} == {settings.in_domain_value!r} "
                     "(inspect.in_domain_value); every sample counts as a distractor")
    return truth, ("ground truth: " + "; ".join(notes)) if notes else None
