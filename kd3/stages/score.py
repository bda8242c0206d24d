"""score: run the teacher once over every downloaded sample; cache logits and pooled features by uid.

Outputs in ``RUN/score/``: ``teacher_outputs.parquet`` (uid, url, shard, key, teacher_label,
teacher_conf, logits [K], feature [D]) and ``meta.json`` (with the teacher's class names and input
spec). The teacher is frozen, so later stages reuse these outputs instead of re-running it.
Resumable per shard: finished shards are kept in ``parts/`` until the final file is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from kd3 import layout
from kd3.config import PipelineConfig, require_file, resolve_path
from kd3.data.images import normalize
from kd3.data.score_cache import fixed_list
from kd3.data.shards import ShardImages, image_loader, list_shards, read_download_index
from kd3.errors import Kd3Error
from kd3.methods.ood import batchnorm_layers, bn_scores_or_none
from kd3.models import ModelMeta, check_checkpoint_code, load_model
from kd3.runs import StageDir, atomic_path, file_fingerprint, require_complete, stage_input_fingerprint
from kd3.runtime import configure

NAME = "score"
SUMMARY = "teacher logits + pooled features for every downloaded sample, cached by uid"
SECTIONS = ("score",)


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    require_complete(run_dir, layout.DOWNLOAD, NAME)
    teacher = require_file(cfg, "score.teacher", resolve_path(cfg.score.teacher, run_dir),
                           "run `kd3 demo-data` or point score.teacher at a kd3 teacher checkpoint")
    check_checkpoint_code(teacher)
    return {"download": stage_input_fingerprint(run_dir, layout.DOWNLOAD), "teacher": file_fingerprint(teacher)}


@torch.no_grad()
def teacher_pass(model, meta: ModelMeta, shard: Path, batch_size: int, num_workers: int,
                 device: torch.device, bn_distance: str = "squared", bn_variance_weight: float = 0.0) -> pa.Table:
    """One shard through the frozen teacher → a table of uid, predictions, logits, features and, for
    a teacher with BatchNorm, the BN in-domain score (overall and per layer; lower = more in-domain),
    all from the same forward pass."""
    loader = image_loader(ShardImages([shard], meta.input), batch_size, num_workers)
    uids, logits, features, bn, bn_layers = [], [], [], [], []
    for batch in loader:
        x = normalize(batch["image"].to(device), meta.input)
        captured = {}
        scores = bn_scores_or_none(model, x, distance=bn_distance, variance_weight=bn_variance_weight,
                                   forward=lambda m, inputs: captured.setdefault("out", m.extract(inputs)))
        out = captured["out"] if scores is not None else model.extract(x)
        uids += list(batch["uid"])
        logits.append(out.logits.float().cpu())
        features.append(out.pooled.float().cpu())
        if scores is not None:
            bn.append(scores.score)
            bn_layers.append(scores.per_layer)
    if not uids:
        return pa.table({"uid": pa.array([], pa.string())})
    logits_t, features_t = torch.cat(logits), torch.cat(features)
    conf, label = logits_t.softmax(1).max(1)
    columns = {"uid": uids, "teacher_label": label.numpy().astype(np.int16), "teacher_conf": conf.numpy(),
               "logits": fixed_list(logits_t.numpy()), "feature": fixed_list(features_t.numpy())}
    if bn:
        columns["bn_score"] = torch.cat(bn).numpy().astype(np.float32)
        columns["bn_per_layer"] = fixed_list(torch.cat(bn_layers).numpy())
    return pa.table(columns)


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    device = configure(cfg.run)
    run_dir = out.run_dir
    model, meta, _ = load_model(resolve_path(cfg.score.teacher, run_dir), device)
    out.write_meta(teacher=meta.to_dict())
    shards = list_shards(run_dir / layout.DOWNLOAD)
    parts = out.path / "parts"
    parts.mkdir(exist_ok=True)
    for shard in tqdm(shards, desc=f"[{NAME}] teacher over shards", unit="shard", disable=None):
        part = parts / f"{shard.stem}.parquet"
        if part.exists():
            continue  # finished before an interruption
        table = teacher_pass(model, meta, shard, cfg.score.batch_size, cfg.score.num_workers, device,
                             cfg.score.bn_distance, cfg.score.bn_variance_weight)
        with atomic_path(part) as tmp:
            pq.write_table(table, tmp)
    tables = [pq.read_table(parts / f"{s.stem}.parquet") for s in shards]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        raise Kd3Error(f"no decodable images in {run_dir / 'download' / 'shards'}; nothing to score")
    scored = pa.concat_tables(tables).to_pandas()
    index = read_download_index(run_dir / layout.DOWNLOAD, columns=["uid", "url", "key", "status"])
    index = index[index["status"] == "success"].drop(columns="status")
    urls = pd.read_parquet(run_dir / layout.DOWNLOAD / layout.URL_LIST, columns=["uid", "url"])
    index["url"] = index["uid"].map(dict(zip(urls["uid"], urls["url"])))
    merged = index.merge(scored, on="uid", how="inner", validate="one_to_one")
    # rows in (shard, key) order: the cache, and every per-row index built on it, is then the same
    # for two downloads of the same URL list
    merged = merged.sort_values(["shard", "key"], kind="stable").reset_index(drop=True)
    columns = ["uid", "url", "shard", "key", "teacher_label", "teacher_conf", "logits", "feature"]
    has_bn = "bn_score" in merged.columns
    if has_bn:
        columns += ["bn_score", "bn_per_layer"]
    with atomic_path(out.path / layout.SCORE_CACHE) as tmp:
        merged[columns].to_parquet(tmp, index=False)
    for part in parts.glob("*.parquet"):
        part.unlink()
    parts.rmdir()
    per_class = merged["teacher_label"].value_counts().sort_index()
    print(f"[{NAME}] scored {len(merged)} samples; teacher mean confidence {merged['teacher_conf'].mean():.3f}")
    if not has_bn:
        print(f"[{NAME}] note: the teacher has no BatchNorm2d layer, so no BN in-domain score is cached "
              "(selectors that need it refuse to run; use a confidence-based selector instead)")
    return {"scored": len(merged), "downloaded_ok": len(index), "undecodable": len(index) - len(merged),
            "num_classes": meta.num_classes, "feature_dim": int(len(merged["feature"].iloc[0])),
            "teacher_label_counts": {meta.class_names[int(k)]: int(v) for k, v in per_class.items()},
            "bn_layers": [name for name, _ in batchnorm_layers(model)] if has_bn else None}
