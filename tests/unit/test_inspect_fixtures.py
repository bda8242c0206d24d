"""Builders for the inspect tests: a hand-made run folder (shards, manifests, meta files). No tests here.

The run has 6 samples in 2 shards and 3 classes, and 2 KD³ epochs whose numbers are easy to check
by hand:

    epoch 0 (α 0.8, τ = 0.9, 0.7, 0.95)      epoch 1 (α 0.5, τ = 0.8, 0.75, 0.96)
    uid  label conf  selected                 uid  label conf  selected
    u0   0     0.95  yes                      u0   0     0.97  yes
    u1   0     0.85  no                       u1   0     0.91  yes   (entered)
    u2   1     0.80  yes                      u2   1     0.65  no    (left)
    u3   1     0.60  no                       u3   2     0.97  yes   (entered, label changed)
    u4   2     0.99  yes                      u4   2     0.99  yes
    u5   2     0.50  no                       u5   2     0.41  no

With ``url_list=True`` the download folder also gets the URL list with the demo's ground truth
(``source``, ``demo_label``), two more URLs that never reached a manifest (u6 broken, u7 an MNIST
digit whose download failed):

    uid  source   demo_label   epoch 0 / select: selected        epoch 1: selected (label)
    u0   mnist    0            yes                               yes (0)
    u1   natural  -1           no                                yes (0)   distractor
    u2   mnist    1            yes                               no
    u3   natural  -1           no                                yes (2)   distractor
    u4   mnist    2            yes                               yes (2)
    u5   mnist    1            no                                no
    u6   broken   -1           (not in the manifests)
    u7   mnist    0            (not in the manifests)

    epoch 0 and select: purity 3/3 = 1, in-domain recall 3/4 (u0 u2 u4 of u0 u2 u4 u5),
                        per true class 0: 1/1, 1: 1/2 (u2 not u5), 2: 1/1; no distractor selected
    epoch 1:            purity 2/4 = 0.5, in-domain recall 2/4 (u0 u4), per true class 1/1, 0/2, 1/1;
                        selected distractors per label [1, 0, 1] (a tie: no class absorbs them)
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import webdataset as wds
from PIL import Image

CLASS_NAMES = ["zero", "one", "two"]
UIDS = [f"u{i}{'0' * 30}" for i in range(6)]  # 32 characters, like real uids
#: the URL list's ground truth per sample (source, demo_label), then the two URLs no manifest has
TRUTH = [("mnist", 0), ("natural", -1), ("mnist", 1), ("natural", -1), ("mnist", 2), ("mnist", 1)]
EXTRA_URLS = [("broken", -1), ("mnist", 0)]
EPOCHS = {
    0: dict(alpha=0.8, tau=[0.9, 0.7, 0.95], labels=[0, 0, 1, 1, 2, 2], conf=[0.95, 0.85, 0.80, 0.60, 0.99, 0.50],
            selected=[True, False, True, False, True, False]),
    1: dict(alpha=0.5, tau=[0.8, 0.75, 0.96], labels=[0, 0, 1, 2, 2, 2], conf=[0.97, 0.91, 0.65, 0.97, 0.99, 0.41],
            selected=[True, True, False, True, True, False]),
}


def png_bytes(i: int, size: int = 8) -> bytes:
    """A small PNG unique to sample ``i``."""
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def shard_of(i: int) -> tuple[str, str]:
    return f"{i // 3:05d}", f"{i:08d}"


def write_shards(shards_dir: Path, n: int = 6) -> dict[str, bytes]:
    """img2dataset-like shards: NNNNN.tar with key.png + key.json (uid, url); returns uid → png bytes."""
    shards_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    for shard in sorted({shard_of(i)[0] for i in range(n)}):
        with wds.TarWriter(str(shards_dir / f"{shard}.tar")) as sink:
            for i in range(n):
                s, key = shard_of(i)
                if s != shard:
                    continue
                images[UIDS[i]] = png_bytes(i)
                meta = {"uid": UIDS[i], "url": f"http://example.invalid/{i}.png", "key": key, "status": "success"}
                sink.write({"__key__": key, "png": images[UIDS[i]], "json": json.dumps(meta).encode()})
    return images


def epoch_frame(epoch: int) -> pd.DataFrame:
    spec = EPOCHS[epoch]
    labels = np.array(spec["labels"], dtype=np.int16)
    selected = np.array(spec["selected"])
    rows = [shard_of(i) for i in range(6)]
    return pd.DataFrame({
        "uid": UIDS, "url": [f"http://example.invalid/{i}.png" for i in range(6)],
        "shard": [r[0] for r in rows], "key": [r[1] for r in rows],
        "epoch": epoch, "selected": selected,
        "teacher_label": labels, "teacher_conf": np.array(spec["conf"], np.float32),
        "student_label": labels, "student_conf": np.array(spec["conf"], np.float32),
        "combined_label": labels, "combined_conf": np.array(spec["conf"], np.float64),
        "class_threshold": np.array(spec["tau"], np.float32)[labels],
        "alpha": np.float32(spec["alpha"]),
        "weight": np.where(selected, 0.5, np.nan).astype(np.float32),
    })


def select_frame() -> pd.DataFrame:
    """The select stage's manifest: teacher predictions only (epoch 0's numbers)."""
    frame = epoch_frame(0)[["uid", "url", "shard", "key", "teacher_label", "teacher_conf", "selected"]].copy()
    frame["teacher_class"] = [CLASS_NAMES[k] for k in frame["teacher_label"]]
    return frame


def url_list_frame() -> pd.DataFrame:
    """The download stage's copy of the URL list: url, source, demo_label, uid (8 URLs, 6 downloaded)."""
    rows = TRUTH + EXTRA_URLS
    return pd.DataFrame({
        "url": [f"http://example.invalid/{i}.png" for i in range(len(rows))],
        "source": [r[0] for r in rows], "demo_label": np.array([r[1] for r in rows], np.int64),
        "uid": UIDS + [f"u{i}{'0' * 30}" for i in range(len(UIDS), len(rows))],
    })


def write_url_list(run: Path, frame: pd.DataFrame | None = None) -> Path:
    path = run / "download" / "url_list.parquet"
    (url_list_frame() if frame is None else frame).to_parquet(path, index=False)
    return path


def _meta(stage: str, counts: dict, **extra) -> str:
    return json.dumps({"stage": stage, "status": "complete", "counts": counts, **extra})


def build_run(root: Path, epochs: bool = True, select: bool = True, url_list: bool = False) -> Path:
    """A run folder with download (shards + meta, and the URL list with ground truth if asked), score meta,
    select and/or train manifests."""
    run = root / "run"
    write_shards(run / "download" / "shards")
    if url_list:
        write_url_list(run)
    (run / "download" / "meta.json").write_text(_meta(
        "download", {"urls": 8, "ok": 6, "failed": 2, "failures_by_reason": {"http 404": 1, "timeout": 1}}))
    (run / "score").mkdir(parents=True)
    (run / "score" / "meta.json").write_text(_meta("score", {"scored": 6}, teacher={"class_names": CLASS_NAMES}))
    if select:
        (run / "select").mkdir()
        select_frame().to_parquet(run / "select" / "manifest.parquet", index=False)
    if epochs:
        (run / "train" / "selection").mkdir(parents=True)
        lines = []
        for epoch in EPOCHS:
            epoch_frame(epoch).to_parquet(run / "train" / "selection" / f"epoch_{epoch:03d}.parquet", index=False)
            spec = EPOCHS[epoch]
            lines.append(json.dumps({"epoch": epoch, "lr": 0.1, "loss": 2.0 - epoch, "loss_fa": 0.5, "loss_con_s": 0.3,
                                     "loss_con_t": 0.2, "train_agreement": 0.5 + 0.2 * epoch, "alpha": spec["alpha"],
                                     "mean_weight": 0.5, "selected": int(sum(spec["selected"])), "samples": 6,
                                     "class_thresholds": spec["tau"], "seconds": 0.1}))
        (run / "train" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run
