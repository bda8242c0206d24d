"""URL lists and per-sample manifests (parquet, one row per sample, joined on ``uid``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from kd3.data.tars import is_plain_key
from kd3.data.urls import UrlRefused, normalize_url
from kd3.errors import Kd3Error

#: columns img2dataset reserves for itself (its main.py refuses a list that passes them on); a URL list
#: may carry them, they stay in RUN/download/url_list.parquet and are joined from there by uid
RESERVED_COLUMNS = {"key", "caption", "url", "status", "error_message", "width", "height", "original_width",
                    "original_height", "exif", "sha256", "md5", "sha512"}
#: tried in order when download.url_column / caption_column are not set (img2dataset's, LAION's, DataComp's)
URL_COLUMNS = ("url", "URL")
CAPTION_COLUMNS = ("caption", "TEXT", "text")
URL_LIST_FORMATS = (".parquet", ".csv", ".tsv", ".txt", ".jsonl")


def url_uid(url: str) -> str:
    """Stable sample id: the first 128 bits of SHA-256 of the URL, hex (independent of row position)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


@dataclass
class UrlList:
    """A crawl list as the download stage uses it, and what it dropped on the way (with counts)."""

    #: one row per URL to fetch: ``url`` (normalised), ``uid``, the caption column and the rest, as given
    frame: pd.DataFrame
    #: the caption column's name in ``frame`` (None: the list has none)
    caption_column: Optional[str]
    #: rows refused before any request: ``uid``, ``url`` (as given), ``reason``
    refused: pd.DataFrame
    #: rows dropped because an earlier row had the same (normalised) URL / the same uid
    duplicate_urls: int = 0
    duplicate_uids: int = 0

    @property
    def extra_columns(self) -> list[str]:
        """Columns img2dataset may carry into the per-shard parquet (its reserved names excluded)."""
        return [c for c in self.frame.columns if c not in RESERVED_COLUMNS and c != self.caption_column]


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in URL_LIST_FORMATS:
        raise Kd3Error(f"{path}: unsupported URL list format {suffix!r} (use {', '.join(URL_LIST_FORMATS)})")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, na_values=[""])
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return pd.DataFrame({"url": [line for line in lines if line and not line.startswith("#")]})
    except Exception as exc:
        raise Kd3Error(f"{path}: cannot read URL list ({type(exc).__name__}: {exc})") from None


def _pick_column(path: Path, frame: pd.DataFrame, wanted: Optional[str], candidates: tuple[str, ...],
                 key: str, required: bool) -> Optional[str]:
    columns = [str(c) for c in frame.columns]
    if wanted is not None:
        if wanted not in columns:
            raise Kd3Error(f"{path}: no column {wanted!r} (set by {key}; columns: {', '.join(columns)})")
        return wanted
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise Kd3Error(f"{path}: URL list has no {' or '.join(repr(c) for c in candidates)} column "
                       f"(columns: {', '.join(columns)}); name yours with {key}")
    return found


def read_url_list(path: Path, url_column: Optional[str] = None, caption_column: Optional[str] = None,
                  port_placeholder: Optional[str] = None) -> UrlList:
    """Read a crawl list (.parquet, .csv, .tsv, .jsonl, or .txt with one URL per line).

    The URL column (``url_column``, else ``url`` or ``URL``) becomes ``url``, normalised by
    :func:`kd3.data.urls.normalize_url`; rows it refuses (not http(s), no host, …) and empty ones
    go to ``refused``. ``uid`` is added if absent (from the normalised URL). A row whose URL or uid
    an earlier row already has is dropped and counted, because a uid must name one sample.
    """
    path = Path(path)
    if not path.is_file():
        raise Kd3Error(f"URL list not found: {path}")
    frame = _read_table(path)
    frame.columns = [str(c) for c in frame.columns]
    url_col = _pick_column(path, frame, url_column, URL_COLUMNS, "download.url_column", required=True)
    caption_col = _pick_column(path, frame, caption_column, CAPTION_COLUMNS, "download.caption_column",
                               required=False)
    if url_col != "url":
        if "url" in frame.columns:
            raise Kd3Error(f"{path}: has both {url_col!r} (the URL column) and 'url'; rename or drop 'url'")
        frame = frame.rename(columns={url_col: "url"})
    if caption_col == url_col:
        raise Kd3Error(f"{path}: download.caption_column {caption_col!r} is the URL column")
    given = frame["url"].map(lambda u: "" if u is None or (isinstance(u, float) and u != u) else str(u).strip())
    normalized, reasons = [], []
    for url in given:
        try:
            normalized.append(normalize_url(url, port_placeholder) if url else None)
            reasons.append(None if url else "empty url")
        except UrlRefused as refusal:
            normalized.append(None)
            reasons.append(refusal.reason)
    frame["url"] = normalized
    refused_mask = np.array([r is not None for r in reasons], dtype=bool)
    refused = pd.DataFrame({"url": given[refused_mask].to_numpy(),
                            "reason": [r for r in reasons if r is not None]})
    refused.insert(0, "uid", refused["url"].map(url_uid))
    frame = frame[~refused_mask].copy()
    if frame.empty:
        raise Kd3Error(f"{path}: URL list has no http(s) URL" + (f" ({len(refused)} refused)" if len(refused) else ""))
    if "uid" not in frame.columns:
        frame["uid"] = frame["url"].map(url_uid)
    frame["uid"] = frame["uid"].astype(str)
    # a uid becomes a tar member name (export) and a join key everywhere: plain keys only
    bad = frame.index[~frame["uid"].map(is_plain_key)]
    if len(bad):
        raise Kd3Error(f"{path}: uid {frame.at[bad[0], 'uid']!r} (row {bad[0]}) is not a plain sample key "
                       f"(1-128 letters, digits, '_' or '-'; {len(bad)} row(s) like it); fix or drop the uid "
                       "column, and kd3 derives uids from the URLs")
    n_read = len(frame)
    frame = frame.drop_duplicates("url", keep="first")
    n_url_unique = len(frame)
    frame = frame.drop_duplicates("uid", keep="first").reset_index(drop=True)
    return UrlList(frame, caption_col, refused.reset_index(drop=True),
                   duplicate_urls=n_read - n_url_unique, duplicate_uids=n_url_unique - len(frame))


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
