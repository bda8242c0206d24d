"""Planted copies for measuring ``kd3 dedup``: light edits of pool and evaluation images added to a web pool.

:func:`plant` writes edited copies of chosen pool files and of evaluation-set images into the
demo's web folder and returns the extra URL-list rows, each saying what it copies
(``planted_of``: the original's URL or ``<eval set>:<index>``) and how (``edit``). The planted
rows come after the original ones in the URL list, so in pool order the original is first and
the copy is the one to remove. :func:`score_planted` compares a dedup result with that truth.
:func:`repeated_urls` writes the "many URLs, few images" pool (one file behind many URLs).

Used by ``tests/e2e/test_dedup.py`` (toy scale) and ``benchmarks/dedup_planted.py`` (demo scale).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from kd3.data.demo import PORT_PLACEHOLDER

#: the light edits: an identical copy, resized ±10 %, JPEG re-encoded at quality 85, brightened by
#: 10 grey levels, shifted by one pixel (the frame's edge pixels repeated)
EDITS = ("copy", "resize_up", "resize_down", "jpeg", "brighter", "shift")
PLANTED = "planted"


def edit_image(image: Image.Image, edit: str) -> tuple[bytes, str]:
    """An edited copy of ``image`` as (encoded bytes, file suffix)."""
    w, h = image.size
    if edit == "copy":
        out = image
    elif edit in ("resize_up", "resize_down"):
        factor = 1.1 if edit == "resize_up" else 0.9
        out = image.resize((max(4, round(w * factor)), max(4, round(h * factor))), Image.Resampling.BICUBIC)
    elif edit == "jpeg":
        buf = io.BytesIO()
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(buf, format="JPEG", quality=85)
        return buf.getvalue(), ".jpg"
    elif edit == "brighter":
        array = np.asarray(image).astype(np.int16) + 10
        out = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    elif edit == "shift":
        array = np.asarray(image)
        pad = ((1, 0), (1, 0)) + (((0, 0),) if array.ndim == 3 else ())
        out = Image.fromarray(np.pad(array, pad, mode="edge")[:h, :w])
    else:
        raise ValueError(f"unknown edit {edit!r} (known: {', '.join(EDITS)})")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _eval_image(array: np.ndarray) -> Image.Image:
    """One image of an evaluation .npz ([H, W], [C, H, W] or [H, W, C] uint8) as a PIL image."""
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array))


def plant(web_root: Path, urls: pd.DataFrame, pool_picks: Sequence[int], eval_sets: dict[str, Path],
          eval_picks: int, seed: int, edits: Sequence[str] = EDITS) -> pd.DataFrame:
    """Write edited copies into ``web_root/planted/`` and return their URL-list rows.

    ``pool_picks``: row positions in ``urls`` (files under ``web_root``) to copy; ``eval_sets``:
    name → .npz with an ``images`` array; ``eval_picks`` images drawn from each. Edits cycle
    through ``edits`` in order, so every edit is planted about equally often."""
    rng = np.random.default_rng(seed)
    (web_root / PLANTED).mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{PORT_PLACEHOLDER}"
    sources: list[tuple[Image.Image, str, int]] = []
    for pos in pool_picks:
        row = urls.iloc[int(pos)]
        rel = str(row["url"]).split(f"{PORT_PLACEHOLDER}/", 1)[1]
        with Image.open(web_root / rel) as img:
            sources.append((img.copy(), str(row["url"]), int(row.get("demo_label", -1))))
    for name, path in eval_sets.items():
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
        for index in sorted(rng.choice(len(images), size=min(eval_picks, len(images)), replace=False).tolist()):
            sources.append((_eval_image(images[index]), f"{name}:{index}", int(labels[index])))
    rows = []
    for k, (image, origin, label) in enumerate(sources):
        edit = edits[k % len(edits)]
        data, suffix = edit_image(image, edit)
        name = f"{PLANTED}/{k:05d}_{edit}{suffix}"
        (web_root / name).write_bytes(data)
        rows.append({"url": f"{base}/{name}", "source": PLANTED, "demo_label": label, "planted_of": origin,
                     "edit": edit})
    return pd.DataFrame(rows)


def repeated_urls(web_root: Path, urls: pd.DataFrame, distinct: Sequence[int], total: int) -> pd.DataFrame:
    """A URL list of ``total`` URLs for the ``distinct`` files of ``urls`` (row positions): each file
    behind total/len(distinct) URLs that differ by a query string, as mirrors and CDNs give."""
    rows = []
    for k in range(total):
        row = urls.iloc[int(distinct[k % len(distinct)])]
        rows.append({**row.to_dict(), "url": f"{row['url']}?copy={k}"})
    return pd.DataFrame(rows)


def score_planted(removed: pd.DataFrame, url_list: pd.DataFrame) -> dict:
    """Recall over the planted copies and precision over the removed samples.

    ``url_list``: the download's ``url_list.parquet`` (uid, url, source, planted_of, edit);
    ``removed``: ``RUN/dedup/removed.parquet``. A planted copy counts as found when it is removed
    and its nearest match is what it copies (the original's uid, or the evaluation item); a removed
    sample that is not planted is a false positive (the originals come first, so they stay)."""
    truth = url_list.set_index("uid")
    uid_of_url = dict(zip(url_list["url"], url_list["uid"]))
    planted = url_list[url_list["source"] == PLANTED]
    removed = removed.set_index("uid")
    found, wrong_match, per_edit = [], [], {}
    for uid, row in planted.set_index("uid").iterrows():
        hit = uid in removed.index
        if hit:
            r = removed.loc[uid]
            if ":" in row["planted_of"] and not str(row["planted_of"]).startswith("http"):
                name, index = str(row["planted_of"]).rsplit(":", 1)
                hit = r["nearest_eval_set"] == name and int(r["nearest_eval_index"]) == int(index)
            else:
                hit = r["nearest_uid"] == uid_of_url.get(row["planted_of"])
            if not hit:
                wrong_match.append(uid)
        found.append(hit)
        stats = per_edit.setdefault(row["edit"], [0, 0])
        stats[0] += int(hit)
        stats[1] += 1
    false_positives = [uid for uid in removed.index if truth.loc[uid, "source"] != PLANTED]
    n_removed = len(removed)
    return {"planted": len(planted), "found": int(sum(found)),
            "recall": float(np.mean(found)) if found else float("nan"),
            "removed": n_removed, "false_positives": len(false_positives),
            "precision": (n_removed - len(false_positives)) / n_removed if n_removed else float("nan"),
            "wrong_match": len(wrong_match), "found_per_edit": {k: f"{a}/{b}" for k, (a, b) in per_edit.items()},
            "false_positive_uids": false_positives[:20]}
