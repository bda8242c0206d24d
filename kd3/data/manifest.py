"""URL lists and per-sample manifests (parquet, one row per sample, joined on ``uid``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from kd3.data.tars import is_plain_key
from kd3.errors import Kd3Error

#: columns img2dataset itself writes; a URL list may not use them for its own data
RESERVED_COLUMNS = {"key", "status", "error_message", "width", "height", "original_width", "original_height",
                    "exif", "sha256", "md5"}


def url_uid(url: str) -> str:
    """Stable sample id: the first 128 bits of SHA-256 of the URL, hex (independent of row position)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


def read_url_list(path: Path) -> pd.DataFrame:
    """Read a URL list (.parquet, .csv, .tsv or .txt with one URL per line); add ``uid`` if absent.

    Duplicate URLs are dropped (keeping the first) because a uid must name one sample.
    """
    path = Path(path)
    if not path.is_file():
        raise Kd3Error(f"URL list not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        elif suffix == ".txt":
            lines = [line.strip() for line in path.read_text().splitlines()]
            frame = pd.DataFrame({"url": [line for line in lines if line and not line.startswith("#")]})
        else:
            raise Kd3Error(f"{path}: unsupported URL list format {suffix!r} (use .parquet, .csv, .tsv or .txt)")
    except Kd3Error:
        raise
    except Exception as exc:
        raise Kd3Error(f"{path}: cannot read URL list ({type(exc).__name__}: {exc})") from None
    if "url" not in frame.columns:
        raise Kd3Error(f"{path}: URL list has no 'url' column (columns: {', '.join(map(str, frame.columns))})")
    reserved = sorted(RESERVED_COLUMNS & set(frame.columns))
    if reserved:
        raise Kd3Error(f"{path}: columns {reserved} are reserved by img2dataset; rename them")
    frame = frame[frame["url"].notna() & (frame["url"].astype(str).str.len() > 0)].copy()
    frame["url"] = frame["url"].astype(str)
    if frame.empty:
        raise Kd3Error(f"{path}: URL list is empty")
    if "uid" not in frame.columns:
        frame["uid"] = frame["url"].map(url_uid)
    frame["uid"] = frame["uid"].astype(str)
    # a uid becomes a tar member name (export) and a join key everywhere: plain keys only
    bad = frame.index[~frame["uid"].map(is_plain_key)]
    if len(bad):
        raise Kd3Error(f"{path}: uid {frame.at[bad[0], 'uid']!r} (row {bad[0]}) is not a plain sample key "
                       f"(1-128 letters, digits, '_' or '-'; {len(bad)} row(s) like it); fix or drop the uid "
                       "column, and kd3 derives uids from the URLs")
    return frame.drop_duplicates("uid", keep="first").reset_index(drop=True)


def selection_manifest(scored: pd.DataFrame, epoch: int, result, alpha: float,
                       student_logits: Optional[torch.Tensor], weights: Optional[torch.Tensor]) -> pd.DataFrame:
    """One row per pool sample: identity, teacher/student/combined predictions, threshold, α, weight.

    ``scored`` is the score cache's frame (uid, url, shard, key, teacher_label, teacher_conf) in row
    order; ``result`` a :class:`kd3.methods.selection.SelectionResult` over the same rows. Student
    columns are -1/NaN when no student ran, ``weight`` NaN where a sample was not trained.
    """
    frame = scored[["uid", "url", "shard", "key", "teacher_label", "teacher_conf"]].copy()
    frame.insert(4, "epoch", epoch)
    frame.insert(5, "selected", result.mask.numpy())
    if student_logits is not None:
        s_conf, s_label = student_logits.softmax(1).max(1)
        frame["student_label"], frame["student_conf"] = s_label.numpy().astype(np.int16), s_conf.numpy()
    else:
        frame["student_label"], frame["student_conf"] = np.int16(-1), np.float32("nan")
    frame["combined_label"] = result.labels.numpy().astype(np.int16)
    frame["combined_conf"] = result.confidences.numpy().astype(np.float32)
    frame["class_threshold"] = result.thresholds[result.labels].numpy().astype(np.float32)
    frame["alpha"] = np.float32(alpha)
    frame["weight"] = np.float32("nan") if weights is None else weights.numpy().astype(np.float32)
    return frame
