"""The report's pool-hygiene section: what ``kd3 dedup`` removed and what each removed sample matched.

Reads ``RUN/dedup/removed.parquet`` and its meta.json; draws one sheet of pairs (removed sample,
then its nearest match: the kept pool sample it duplicates or the evaluation image it copies) and
gives a table of every shown pair. Pool images come from the download's shards, evaluation images
from the sets of the config's ``evaluate.datasets`` (a set the config no longer names gets grey tiles).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from kd3 import layout
from kd3.data import eval_sets
from kd3.inspect.sheets import UID_CHARS, _font, load_thumbnails, thumbnail
from kd3.runs import atomic_path, read_meta

SHEET = "dedup_pairs.png"
_PAD, _CAPTION, _PAIRS_PER_ROW = 4, 26, 4
_PLACEHOLDER = (200, 200, 200)


@dataclass
class DedupView:
    counts: dict[str, Any]
    #: the shown pairs: reason, removed uid, nearest (uid or "set:index"), similarity, urls
    rows: list[dict[str, Any]] = field(default_factory=list)
    removed: int = 0
    sheet: Optional[Path] = None


def _eval_thumbnails(pairs: pd.DataFrame, datasets: dict[str, tuple[Path, str, Optional[str]]],
                     class_names: Sequence[str], size: int) -> dict[str, Image.Image]:
    """"set:index" → thumbnail of each evaluation item the shown pairs name (sets read once, in order)."""
    thumbs: dict[str, Image.Image] = {}
    wanted = pairs.dropna(subset=["nearest_eval_set"])
    for name, group in wanted.groupby("nearest_eval_set"):
        if name not in datasets:
            continue
        path, fmt, label_key = datasets[name]
        indices = set(int(i) for i in group["nearest_eval_index"])
        data = eval_sets.open_eval_set(str(name), path, class_names, fmt, label_key)
        start = 0
        for images, _ in data.batches(256):
            for k, image in enumerate(images):
                if start + k in indices:
                    array = image.numpy()
                    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
                    buf = io.BytesIO()
                    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
                    thumbs[f"{name}:{start + k}"] = thumbnail(buf.getvalue(), size)
            start += len(images)
            if start > max(indices):
                break
    return thumbs


def _render(pairs: list[dict[str, Any]], thumbs: dict[str, Optional[Image.Image]], size: int) -> Image.Image:
    font = _font(10)
    pair_w = 2 * size + 3 * _PAD
    width = _PAD + _PAIRS_PER_ROW * (pair_w + _PAD)
    rows = -(-len(pairs) // _PAIRS_PER_ROW)
    sheet = Image.new("RGB", (width, _PAD + rows * (size + _CAPTION + _PAD)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, pair in enumerate(pairs):
        x = _PAD + (n % _PAIRS_PER_ROW) * (pair_w + _PAD)
        y = _PAD + (n // _PAIRS_PER_ROW) * (size + _CAPTION + _PAD)
        draw.rectangle([x - 2, y - 2, x + pair_w - _PAD + 1, y + size + _CAPTION - 4], outline=(180, 180, 220))
        for k, key in enumerate((pair["uid"], pair["nearest"])):
            left = x + _PAD // 2 + k * (size + _PAD)
            image = thumbs.get(key)
            if image is not None:
                sheet.paste(image, (left, y))
            else:
                draw.rectangle([left, y, left + size - 1, y + size - 1], fill=_PLACEHOLDER)
            name, _, index = str(key).rpartition(":")
            caption = f"{name[:6]}:{index}" if name else str(key)[:UID_CHARS]  # an evaluation item, or a uid
            draw.text((left, y + size + 1), caption, fill=(0, 0, 0), font=font)
        draw.text((x + _PAD // 2, y + size + 12), f"{pair['reason'].split('_')[-1]} {pair['similarity']:.4f}",
                  fill=(80, 80, 80), font=font)
    return sheet


def dedup_view(run_dir: Path, out_dir: Path, datasets: dict[str, tuple[Path, str, Optional[str]]],
               class_names: Sequence[str], size: int, limit: int = 48) -> Optional[DedupView]:
    """The section's data and its sheet (``out_dir/sheets/dedup_pairs.png``); None without a finished dedup stage."""
    meta = read_meta(Path(run_dir) / layout.DEDUP)
    removed_path = layout.dedup_removed(run_dir)
    if meta is None or meta.get("status") != "complete" or not removed_path.is_file():
        return None
    removed = pd.read_parquet(removed_path)
    view = DedupView(counts=dict(meta.get("counts", {})), removed=len(removed))
    if removed.empty:
        return view
    # the closest calls first: they are the ones a threshold change would flip
    shown = removed.sort_values(["similarity", "uid"], kind="stable").head(limit).reset_index(drop=True)
    for r in shown.itertuples(index=False):
        nearest = r.nearest_uid if isinstance(r.nearest_uid, str) else f"{r.nearest_eval_set}:{int(r.nearest_eval_index)}"
        view.rows.append({"reason": r.reason, "uid": r.uid, "nearest": nearest, "similarity": float(r.similarity),
                          "url": r.url, "nearest_url": r.nearest_url if isinstance(r.nearest_url, str) else ""})
    pool = shown[["uid", "shard", "key"]]
    keys = pd.read_parquet(layout.score_cache(run_dir), columns=["uid", "shard", "key"])
    matches = keys[keys["uid"].isin(shown["nearest_uid"].dropna())]
    thumbs: dict[str, Optional[Image.Image]] = {}
    thumbs.update(load_thumbnails(Path(run_dir) / layout.DOWNLOAD / "shards", pd.concat([pool, matches]), size))
    thumbs.update(_eval_thumbnails(shown, datasets, class_names, size))
    view.sheet = Path(out_dir) / "sheets" / SHEET
    with atomic_path(view.sheet) as tmp:
        _render(view.rows, thumbs, size).save(tmp, format="PNG")
    return view
