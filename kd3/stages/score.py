"""score: run the teacher once over every downloaded sample; cache logits and pooled features by uid.

Outputs in ``RUN/score/``: ``teacher_outputs.parquet`` (uid, url, shard, key, teacher_label,
teacher_conf, logits [K], feature [D]) and ``meta.json`` (with the teacher's class names and input
spec). The teacher is frozen, so later stages reuse these outputs instead of re-running it.
Resumable per shard: finished shards are kept in ``parts/`` until the final file is written.
Under torchrun each rank scores its share of the shards into ``parts/`` and rank 0 assembles them
(the same cache as one process: every shard is its own teacher pass either way).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kd3 import dist, layout
from kd3.compute import Compute
from kd3.config import PipelineConfig, require_file, resolve_path
from kd3.data.pixel_cache import stack_padded
from kd3.data.score_cache import fixed_list, score_output_fingerprints
from kd3.data.shards import (LoaderOptions, ShardImages, check_shards_unchanged, image_loader, list_shards,
                             read_download_index, shards_dir)
from kd3.errors import Kd3Error
from kd3.methods.ood import batchnorm_layers, bn_scores_or_none
from kd3.models import ModelMeta, check_checkpoint_code, load_model
from kd3.progress import Progress
from kd3.runs import StageDir, atomic_path, check_skipped, file_fingerprint, stage_input_fingerprint
from kd3.runtime import configure

log = logging.getLogger(__name__)

NAME = "score"
SUMMARY = "teacher logits + pooled features for every downloaded sample, cached by uid"
SECTIONS = ("score",)
#: runs on every rank under torchrun (kd3.stages.base): shards split by rank, rank 0 assembles
DISTRIBUTED = True


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    check_shards_unchanged(run_dir, NAME)
    teacher = require_file(cfg, "score.teacher", resolve_path(cfg.score.teacher, run_dir),
                           "run `kd3 demo-data` or point score.teacher at a kd3 teacher checkpoint")
    check_checkpoint_code(teacher)
    load_model(teacher, "cpu")  # weights that do not fit, pickled objects …: before the folder is touched
    return {"download": stage_input_fingerprint(run_dir, layout.DOWNLOAD), "teacher": file_fingerprint(teacher)}


@torch.inference_mode()  # a frozen teacher in eval mode: outputs are stored, never differentiated
def teacher_pass(model, meta: ModelMeta, shard: Path, batch_size: int, workers: Union[int, LoaderOptions],
                 device: torch.device, bn_distance: str = "squared", bn_variance_weight: float = 0.0,
                 decoded: Optional[list[torch.Tensor]] = None, maps: Optional[list[torch.Tensor]] = None,
                 progress: Optional[Progress] = None, compute: Optional[Compute] = None) -> pa.Table:
    """One shard through the frozen teacher → a table of uid, predictions, logits, features and, for
    a teacher with BatchNorm, the BN in-domain score (overall and per layer; lower = more in-domain),
    all from the same forward pass. The decoded images and the teacher's feature maps are appended
    to ``decoded`` and ``maps`` when given (in the table's row order), for the score stage's caches.
    ``compute``: the forward's precision and memory format (default: float32 on ``device``)."""
    compute = compute or Compute(device=device)
    loader = image_loader(ShardImages([shard], meta.input, keep_decoded=decoded is not None), batch_size, workers)
    uids, logits, features, bn, bn_layers = [], [], [], [], []
    for batch in loader:
        if decoded is not None:
            decoded += batch["decoded"]
        x = compute.images(batch["image"], meta.input)
        captured = {}
        with compute.autocast():
            scores = bn_scores_or_none(model, x, distance=bn_distance, variance_weight=bn_variance_weight,
                                       forward=lambda m, inputs: captured.setdefault("out", m.extract(inputs)))
        if scores is None:
            with compute.autocast():
                captured["out"] = model.extract(x)
        out = captured["out"]
        uids += list(batch["uid"])
        if progress is not None:
            progress.update(len(batch["uid"]))
        logits.append(out.logits.float().cpu())
        if maps is not None:
            maps.append(out.feature_map.float().cpu().contiguous())  # NCHW, also after channels_last
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


def _save_part_pixels(decoded: list[torch.Tensor], path: Path, max_side: int) -> bool:
    """One shard's decoded images (kd3.data.pixel_cache format) as a part; False (no cache for
    this pool) when their sizes differ or exceed ``max_side``."""
    stacked = stack_padded([image.numpy() for image in decoded], max_side) if decoded else \
        (np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.uint8))
    if stacked is None:
        return False
    _save_part(path, stacked[0], channels=stacked[1])
    return True


def _save_part_maps(maps: list[torch.Tensor], path: Path, max_floats: int) -> bool:
    """One shard's teacher feature maps as a part; False (no cache) when a map is larger than
    ``max_floats`` values."""
    data = torch.cat(maps).numpy() if maps else np.zeros((0, 1, 1, 1), np.float32)
    if len(data) and data[0].size > max_floats:
        return False
    _save_part(path, data)
    return True


def _assemble(parts: list[Path], part_uids: pd.Series, row_uids: pd.Series, path: Path) -> dict[str, np.ndarray]:
    """Per-shard .npz parts (arrays ``data`` [n, ...] and optional ``channels`` [n], rows in the
    parts' uid order) → ``path`` (.npy, memory-mapped while written) in score-cache row order,
    one part at a time; ``data`` is zero-padded on axis 1 to the widest part. Returns the other
    per-row arrays (``channels``) in row order."""
    shapes, dtypes = [], set()
    for f in parts:
        with np.load(f) as part:
            if len(part["data"]):
                shapes.append(part["data"].shape[1:])
                dtypes.add(part["data"].dtype)
    shape = (max(s[0] for s in shapes), *shapes[0][1:])
    row_of = dict(zip(row_uids, range(len(row_uids))))
    extra: dict[str, np.ndarray] = {}
    with atomic_path(path) as tmp:
        cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtypes.pop(), shape=(len(row_uids), *shape))
        start = 0
        for f in parts:
            with np.load(f) as part:
                arrays = dict(part)
            n = len(arrays["data"])
            uids = part_uids.iloc[start:start + n]
            start += n
            pairs = [(i, row_of[uid]) for i, uid in enumerate(uids) if uid in row_of]
            if not pairs:
                continue
            src, dst = (np.array(v) for v in zip(*pairs))
            cache[dst, :arrays["data"].shape[1]] = arrays["data"][src]
            for name, values in arrays.items():
                if name != "data":
                    extra.setdefault(name, np.zeros(len(row_uids), values.dtype))[dst] = values[src]
        cache.flush()
        del cache
    return extra


def _save_part(path: Path, data: np.ndarray, **per_row: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, data=data, **per_row)


def _write_caches(cfg: PipelineConfig, part_uids: pd.Series, row_uids: pd.Series, parts: Path,
                  shards: list[Path], out_dir: Path) -> dict[str, Optional[str]]:
    """The pixel and feature-map caches from the per-shard parts; a cache whose parts are not all
    there (the pool's images differ in size, or it is switched off or too large) is not written."""
    written: dict[str, Optional[str]] = {}
    for name, suffix, path in (("pixel_cache", "pixels", layout.PIXEL_CACHE),
                               ("feature_map_cache", "maps", layout.FEATURE_MAP_CACHE)):
        files = [parts / f"{shard.stem}.{suffix}.npz" for shard in shards]
        written[name] = None
        if getattr(cfg.score, name) and all(f.is_file() for f in files):
            sizes = set()
            for f in files:
                with np.load(f) as part:
                    if len(part["data"]):
                        sizes.add(part["data"].shape[2:])
            if len(sizes) == 1:
                extra = _assemble(files, part_uids, row_uids, out_dir / path)
                if "channels" in extra:
                    with atomic_path(out_dir / layout.PIXEL_CHANNELS) as tmp:
                        with open(tmp, "wb") as f:
                            np.save(f, extra["channels"])
                written[name] = f"{path} {(out_dir / path).stat().st_size / 2**20:.1f} MB"
    return written


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    device = configure(cfg.run)
    compute = Compute.from_config(cfg.run, device)
    run_dir = out.run_dir
    model, meta, _ = load_model(resolve_path(cfg.score.teacher, run_dir), device)
    model = compute.model(model)
    out.write_meta(teacher=meta.to_dict())
    shards = list_shards(run_dir / layout.DOWNLOAD)
    parts = out.path / "parts"
    parts.mkdir(exist_ok=True)
    index = read_download_index(run_dir / layout.DOWNLOAD, columns=["uid", "url", "key", "status"])
    index = index[index["status"] == "success"].drop(columns="status")
    per_shard = index["shard"].value_counts()
    todo = [s for s in shards if not (parts / f"{s.stem}.parquet").exists()]  # the rest finished before an interruption
    # under torchrun: rank 0's list (before any rank writes a part), each rank scoring its share
    todo = dist.rank_split(dist.broadcast_object(todo))
    keep_pixels, keep_maps = cfg.score.pixel_cache, cfg.score.feature_map_cache
    with Progress(desc=f"[{NAME}] teacher", unit="samples", total=len(index),
                  initial=len(index) - int(sum(per_shard.get(s.stem, 0) for s in todo))) as progress:
        for shard in todo:
            decoded: Optional[list[torch.Tensor]] = [] if keep_pixels else None
            maps: Optional[list[torch.Tensor]] = [] if keep_maps else None
            table = teacher_pass(model, meta, shard, cfg.score.batch_size, compute.section_loader(cfg.score), device,
                                 cfg.score.bn_distance, cfg.score.bn_variance_weight, decoded, maps, progress, compute)
            if keep_pixels:
                keep_pixels = _save_part_pixels(decoded, parts / f"{shard.stem}.pixels.npz",
                                                cfg.score.pixel_cache_max_side)
            if keep_maps:
                keep_maps = _save_part_maps(maps, parts / f"{shard.stem}.maps.npz",
                                            cfg.score.feature_map_cache_max_floats)
            with atomic_path(parts / f"{shard.stem}.parquet") as tmp:  # written last: a finished part implies its caches
                pq.write_table(table, tmp)
    dist.barrier()  # every rank's parts are written; rank 0 assembles them
    if not dist.is_main():
        return {}
    tables = [pq.read_table(parts / f"{s.stem}.parquet") for s in shards]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        raise Kd3Error(f"no decodable images in {run_dir / 'download' / 'shards'}; nothing to score")
    scored = pa.concat_tables(tables).to_pandas()
    urls = pd.read_parquet(run_dir / layout.DOWNLOAD / layout.URL_LIST, columns=["uid", "url"])
    index["url"] = index["uid"].map(dict(zip(urls["uid"], urls["url"])))
    merged = index.merge(scored, on="uid", how="inner", validate="one_to_one")
    check_skipped(len(index) - len(merged), len(index), cfg.score.max_skipped_fraction,
                  f"[{NAME}] {shards_dir(run_dir / layout.DOWNLOAD)}", "score.max_skipped_fraction")
    # rows in (shard, key) order: the cache, and every per-row index built on it, is then the same
    # for two downloads of the same URL list
    merged = merged.sort_values(["shard", "key"], kind="stable").reset_index(drop=True)
    columns = ["uid", "url", "shard", "key", "teacher_label", "teacher_conf", "logits", "feature"]
    has_bn = "bn_score" in merged.columns
    if has_bn:
        columns += ["bn_score", "bn_per_layer"]
    caches = _write_caches(cfg, scored["uid"], merged["uid"], parts, shards, out.path)
    with atomic_path(out.path / layout.SCORE_CACHE) as tmp:
        merged[columns].to_parquet(tmp, index=False)
    shutil.rmtree(parts)
    out.write_meta(outputs=score_output_fingerprints(out.path))  # later stages refuse a changed cache
    per_class = merged["teacher_label"].value_counts().sort_index()
    log.info(f"[{NAME}] scored {len(merged)} samples; teacher mean confidence {merged['teacher_conf'].mean():.3f}")
    if not has_bn:
        log.info(f"[{NAME}] note: the teacher has no BatchNorm2d layer, so no BN in-domain score is cached "
                 "(selectors that need it refuse to run; use a confidence-based selector instead)")
    return {"scored": len(merged), **caches, "downloaded_ok": len(index), "undecodable": len(index) - len(merged),
            "num_classes": meta.num_classes, "feature_dim": int(len(merged["feature"].iloc[0])),
            "teacher_label_counts": {meta.class_names[int(k)]: int(v) for k, v in per_class.items()},
            "bn_layers": [name for name, _ in batchnorm_layers(model)] if has_bn else None}
