"""dedup: pool hygiene between score and select/train — exact and near duplicates, eval contamination.

Reads the score stage's cache (uids in pool order, teacher features, the decoded-pixel cache or
else the download's shards) and the evaluation sets of ``evaluate.datasets`` named by
``dedup.eval_sets``. The rule (:func:`kd3.methods.dedup.plan_removal`): identical decoded pixels
are exact duplicates; a pool image whose perceptual descriptor (and, when set, teacher feature) is
within the thresholds of an evaluation image is contamination; of the rest, one within the
thresholds of an image kept earlier in pool order is a near duplicate.

A stage of its own, not a step inside score: its thresholds and evaluation sets change without
re-running the teacher, and select/train opt in by naming its output (``select.exclude`` /
``train.exclude`` = ``{run}/dedup/removed.parquet``), so a run folder never changes training by
the mere presence of a folder.

Outputs in ``RUN/dedup/``: ``removed.parquet`` (uid, url, shard, key, reason, nearest_uid,
nearest_url, nearest_eval_set, nearest_eval_index, similarity), ``keep.parquet`` (uid, url, shard,
key of every kept sample) and ``meta.json`` (counts per reason, per evaluation set, thresholds).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pandas as pd
import torch

from kd3 import layout
from kd3.config import DedupSection, PipelineConfig, resolve_path
from kd3.data import eval_sets
from kd3.data.images import normalize, prepare_uint8
from kd3.data.score_cache import TeacherOutputs, load_teacher_outputs
from kd3.data.shards import ShardImages, image_loader, list_shards
from kd3.errors import ConfigError, Kd3Error
from kd3.methods import dedup as D
from kd3.models import check_checkpoint_code, load_model
from kd3.progress import Progress
from kd3.runs import StageDir, atomic_path, file_fingerprint, require_complete, stage_input_fingerprint
from kd3.runtime import configure

log = logging.getLogger(__name__)

NAME = "dedup"
SUMMARY = "remove exact / near-duplicate pool images and pool copies of evaluation images → removed.parquet"
SECTIONS = ("dedup",)
#: the teacher for evaluation-set features (score.teacher) and the batch size of those passes
READS = ("score",)
_BATCH = 512


def _eval_datasets(cfg: PipelineConfig) -> list:
    """The evaluate.datasets entries named by dedup.eval_sets (None: all; [] or no evaluate section: none)."""
    wanted = cfg.dedup.eval_sets
    available = list(cfg.evaluate.datasets) if cfg.evaluate is not None else []
    if wanted is None:
        return available
    by_name = {d.name: d for d in available}
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        known = ", ".join(by_name) or "none: the config has no evaluate.datasets"
        raise ConfigError(f"{cfg.source}: dedup.eval_sets: {unknown[0]!r} is not an evaluate.datasets name "
                          f"(known: {known})")
    return [by_name[name] for name in wanted]


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    require_complete(run_dir, layout.SCORE, NAME)
    inputs = {"score": stage_input_fingerprint(run_dir, layout.SCORE)}
    for d in _eval_datasets(cfg):
        inputs[f"eval.{d.name}"] = eval_sets.fingerprint(resolve_path(d.path, run_dir), d.format)
    if cfg.dedup.feature_similarity is not None and _eval_datasets(cfg):
        teacher = resolve_path(cfg.score.teacher, run_dir)
        if not teacher.is_file():
            raise ConfigError(f"{cfg.source}: score.teacher: file not found: {teacher} (dedup.feature_similarity "
                              "needs the teacher's features of the evaluation images)")
        check_checkpoint_code(teacher)
        inputs["teacher"] = file_fingerprint(teacher)
    return inputs


def _pool_images(scores: TeacherOutputs, run_dir: Path,
                 rows: Optional[np.ndarray] = None) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """(score-cache rows, decoded uint8 images) in batches, of every row or of ``rows``: from the
    pixel cache, else decoded from the shards."""
    wanted = np.arange(len(scores.frame)) if rows is None else np.asarray(rows)
    if scores.pixels is not None:
        for start in range(0, len(wanted), _BATCH):
            chunk = wanted[start:start + _BATCH]
            yield chunk, [scores.pixels.image(int(r)) for r in chunk]
        return
    uid_to_row = scores.uid_to_row
    if rows is not None:
        keep = set(wanted.tolist())
        uid_to_row = {uid: r for uid, r in uid_to_row.items() if r in keep}
    dataset = ShardImages(list_shards(run_dir / layout.DOWNLOAD), scores.teacher.input, uid_to_row=uid_to_row,
                          keep_decoded=True)
    for batch in image_loader(dataset, _BATCH, 0):
        yield batch["row"].numpy(), [image.numpy() for image in batch["decoded"]]


@dataclass
class _Images:
    """Per image (row order): pixel digest and untranslated perceptual descriptor (None: signal off)."""

    digests: list[str]
    descriptors: Optional[np.ndarray]


def _describe(batches: Iterator[tuple[np.ndarray, list[np.ndarray]]], n: int, cfg: PipelineConfig,
              progress: Progress) -> _Images:
    c = cfg.dedup
    digests: list[Optional[str]] = [None] * n
    descriptors = np.zeros((n, 3 * c.perceptual_size ** 2), np.float32) if c.perceptual_similarity is not None else None
    for rows, images in batches:
        for r, image in zip(rows.tolist(), images):
            digests[r] = D.pixel_digest(image)
        if descriptors is not None:
            descriptors[rows] = D.perceptual_descriptors(images, c.perceptual_size)[:, 0]
        progress.update(len(rows))
    missing = sum(d is None for d in digests)
    if missing:
        raise Kd3Error(f"{missing} scored samples could not be read back from the shards; rerun `kd3 score --overwrite`")
    return _Images(digests, descriptors)  # type: ignore[arg-type]


@dataclass
class _EvalImages(_Images):
    features: Optional[np.ndarray]
    #: (name, size) per evaluation set, in the order their items are numbered
    sizes: list[tuple[str, int]]
    #: the decoded images (uint8 [C, H, W]), for the verification of candidate pairs
    images: list[np.ndarray]


def _eval_images(cfg: PipelineConfig, run_dir: Path, scores: TeacherOutputs, progress: Progress) -> _EvalImages:
    """Digests, descriptors and (with dedup.feature_similarity) teacher features of every chosen
    evaluation image, the sets one after the other."""
    model = meta = None
    device = torch.device("cpu")
    datasets = _eval_datasets(cfg)
    if cfg.dedup.feature_similarity is not None and datasets:
        device = configure(cfg.run)
        model, meta, _ = load_model(resolve_path(cfg.score.teacher, run_dir), device)
        model.eval()
    images: list[np.ndarray] = []
    features: list[torch.Tensor] = []
    sizes = []
    for d in datasets:
        data = eval_sets.open_eval_set(d.name, resolve_path(d.path, run_dir), scores.teacher.class_names,
                                       d.format, d.label_key)
        before = len(images)
        for batch, _ in data.batches(cfg.score.batch_size):
            images += [image.numpy() for image in batch]
            if model is not None:
                x = torch.stack([prepare_uint8(image, meta.input) for image in batch])
                with torch.no_grad():
                    features.append(model.extract(normalize(x.to(device), meta.input)).pooled.float().cpu())
        sizes.append((d.name, len(images) - before))
    described = _describe(iter([(np.arange(len(images)), images)]), len(images), cfg, progress)
    return _EvalImages(described.digests, described.descriptors,
                       D.unit_rows(torch.cat(features)) if features else None, sizes, images)


def _similar(cfg: PipelineConfig, scores: TeacherOutputs, run_dir: Path, pool: _Images, reps: np.ndarray,
             evaluation: _EvalImages, progress: Progress) -> tuple[D.Pairs, D.Pairs]:
    """Similar (pool, pool) and (pool, evaluation) pairs among the exact-duplicate representatives
    ``reps``: every enabled threshold met. Perceptual candidates come from the translated views of
    each representative against the untranslated descriptors; the teacher features filter them,
    then (dedup.verify_similarity) the aligned correlation of each candidate pair decides."""
    c = cfg.dedup
    features = D.unit_rows(scores.features) if c.feature_similarity is not None else None
    has_eval = len(evaluation.digests) > 0
    if c.perceptual_similarity is None:
        if features is None:
            return D.no_pairs(), D.no_pairs()
        i, j, s = D.similar_pairs(features[reps], features[reps], c.feature_similarity)
        pool_pairs = reps[i], reps[j], s
        eval_pairs = D.no_pairs()
        if has_eval:
            i, j, s = D.similar_pairs(features[reps], evaluation.features, c.feature_similarity)
            eval_pairs = reps[i], j, s
        return pool_pairs, eval_pairs
    database = np.ascontiguousarray(pool.descriptors[reps])
    pool_parts, eval_parts = [], []
    for rows, images in _pool_images(scores, run_dir, reps):
        views = D.perceptual_descriptors(images, c.perceptual_size, c.max_shift)
        i, j, s = D.similar_pairs(views, database, c.perceptual_similarity)
        pool_parts.append((rows[i], reps[j], s))
        if has_eval:
            i, j, s = D.similar_pairs(views, evaluation.descriptors, c.perceptual_similarity)
            eval_parts.append((rows[i], j, s))
        progress.update(len(rows))
    pool_pairs, eval_pairs = D.concat_pairs(pool_parts), D.concat_pairs(eval_parts)
    # counted before verification and in both orders (the pool pairs) or once (the evaluation pairs)
    log.info(f"[{NAME}] perceptual candidates: {len(pool_pairs[0])} pool pairs, {len(eval_pairs[0])} evaluation pairs")
    if features is not None:
        i, j, s = pool_pairs
        keep = D.pair_cosine(features, features, i, j) >= c.feature_similarity
        pool_pairs = i[keep], j[keep], s[keep]
        if has_eval:
            i, j, s = eval_pairs
            keep = D.pair_cosine(features, evaluation.features, i, j) >= c.feature_similarity
            eval_pairs = i[keep], j[keep], s[keep]
    if c.verify_similarity is not None:  # the final word on every perceptual candidate
        pool_pairs, eval_pairs = _verify(cfg, scores, run_dir, pool_pairs, eval_pairs, evaluation)
    return pool_pairs, eval_pairs


def _verify(cfg: PipelineConfig, scores: TeacherOutputs, run_dir: Path, pool_pairs: D.Pairs, eval_pairs: D.Pairs,
            evaluation: _EvalImages) -> tuple[D.Pairs, D.Pairs]:
    """The candidate pairs whose aligned correlation (:func:`kd3.methods.dedup.aligned_similarity`)
    reaches dedup.verify_similarity, that correlation as their similarity. Only the images in a
    candidate pair are read again and brought to the verification size."""
    c = cfg.dedup
    i, j, _ = pool_pairs
    # the range search gives each pool pair in both orders (and each image with itself): verify each once
    later, earlier = np.maximum(i, j), np.minimum(i, j)
    pool_i, pool_j = (np.unique(np.stack([later, earlier], 1)[later != earlier], axis=0).T if len(i)
                      else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    eval_i, eval_j, _ = eval_pairs
    rows = np.unique(np.concatenate([pool_i, pool_j, eval_i])).astype(np.int64)
    local = np.full(len(scores.frame), -1, np.int64)
    local[rows] = np.arange(len(rows))
    images = torch.zeros((len(rows), 3, c.verify_size, c.verify_size))
    grey = np.zeros(len(rows), dtype=bool)
    for batch_rows, batch in _pool_images(scores, run_dir, rows):
        images[local[batch_rows]] = D.verification_images(batch, c.verify_size)
        grey[local[batch_rows]] = [image.shape[0] == 1 for image in batch]
    verified_pool = _verified(images, grey, images, grey, local[pool_i], local[pool_j], c)
    items = np.unique(eval_j)
    eval_local = np.full(len(evaluation.digests), -1, np.int64)
    eval_local[items] = np.arange(len(items))
    chosen = [evaluation.images[e] for e in items.tolist()]
    eval_grey = np.array([image.shape[0] == 1 for image in chosen], dtype=bool)
    verified_eval = _verified(images, grey, D.verification_images(chosen, c.verify_size), eval_grey,
                              local[eval_i], eval_local[eval_j], c)
    keep_pool, keep_eval = verified_pool >= c.verify_similarity, verified_eval >= c.verify_similarity
    return ((pool_i[keep_pool], pool_j[keep_pool], verified_pool[keep_pool]),
            (eval_i[keep_eval], eval_j[keep_eval], verified_eval[keep_eval]))


def _verified(a: torch.Tensor, a_grey: np.ndarray, b: torch.Tensor, b_grey: np.ndarray, i: np.ndarray,
              j: np.ndarray, c: DedupSection) -> np.ndarray:
    """Aligned correlation of the pairs (a[i[k]], b[j[k]]); a pair of two grey images is compared on one
    channel, which gives the same correlation (its three channels are equal) at a third of the cost."""
    scores = np.zeros(len(i), np.float32)
    both_grey = a_grey[i] & b_grey[j]
    for subset, channels in ((both_grey, slice(0, 1)), (~both_grey, slice(0, 3))):
        if subset.any():
            scores[subset], _ = D.aligned_similarity(a[:, channels], b[:, channels], i[subset], j[subset],
                                                     c.verify_shift)
    return scores


def _manifests(scores: TeacherOutputs, removal: D.Removal, eval_sizes: list[tuple[str, int]],
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = scores.frame[["uid", "url", "shard", "key"]].reset_index(drop=True)
    removed_rows = np.flatnonzero(~removal.kept)
    removed = frame.iloc[removed_rows].reset_index(drop=True)
    reasons = [removal.reason[r] for r in removed_rows]
    nearest = removal.nearest[removed_rows]
    is_eval = np.array([r == D.CONTAMINATION for r in reasons], dtype=bool)
    pool_match = np.where(is_eval, 0, nearest)
    starts = np.cumsum([0] + [size for _, size in eval_sizes])
    set_of = np.searchsorted(starts, nearest, side="right") - 1 if len(eval_sizes) else np.zeros(len(nearest), int)
    removed["reason"] = reasons
    removed["nearest_uid"] = np.where(is_eval, None, frame["uid"].to_numpy()[pool_match]).astype(object)
    removed["nearest_url"] = np.where(is_eval, None, frame["url"].to_numpy()[pool_match]).astype(object)
    removed["nearest_eval_set"] = [eval_sizes[s][0] if e else None for s, e in zip(set_of.tolist(), is_eval)]
    removed["nearest_eval_index"] = pd.array([int(n - starts[s]) if e else None
                                              for n, s, e in zip(nearest.tolist(), set_of.tolist(), is_eval)],
                                             dtype="Int64")
    removed["similarity"] = removal.similarity[removed_rows].astype(np.float32)
    return removed, frame.iloc[np.flatnonzero(removal.kept)].reset_index(drop=True)


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    import faiss

    # faiss and torch each run an OpenMP pool; one size for both keeps them from oversubscribing the cores
    faiss.omp_set_num_threads(cfg.run.num_threads or torch.get_num_threads())
    scores = load_teacher_outputs(out.run_dir)
    n = len(scores.frame)
    with Progress(desc=f"[{NAME}] images", unit="images", total=None) as progress:
        pool = _describe(_pool_images(scores, out.run_dir), n, cfg, progress)
        evaluation = _eval_images(cfg, out.run_dir, scores, progress)
        reps = np.unique(D.representatives(pool.digests))
        pool_pairs, eval_pairs = _similar(cfg, scores, out.run_dir, pool, reps, evaluation, progress)
    removal = D.plan_removal(pool.digests, evaluation.digests, pool_pairs, eval_pairs)
    removed, kept = _manifests(scores, removal, evaluation.sizes)
    with atomic_path(out.path / layout.DEDUP_REMOVED) as tmp:
        removed.to_parquet(tmp, index=False)
    with atomic_path(out.path / layout.DEDUP_KEEP) as tmp:
        kept.to_parquet(tmp, index=False)
    by_reason = {reason: int((removed["reason"] == reason).sum()) for reason in D.REASONS}
    per_set = {name: int((removed["nearest_eval_set"] == name).sum()) for name, _ in evaluation.sizes}
    against = ", ".join(f"{name} ({size})" for name, size in evaluation.sizes)
    log.info(f"[{NAME}] kept {len(kept)} of {n} pool samples ({len(reps)} distinct images); removed {len(removed)}: "
             + ", ".join(f"{v} {k}" for k, v in by_reason.items())
             + (f"; decontaminated against {against}" if against else "; no evaluation set to decontaminate against"))
    return {"pool": n, "kept": len(kept), "removed": len(removed), "removed_by_reason": by_reason,
            "distinct_pixels": len(reps), "eval_sets": dict(evaluation.sizes),
            "contamination_per_eval_set": per_set, "similar_pool_pairs": len(pool_pairs[0]),
            "removed_manifest": str(out.path / layout.DEDUP_REMOVED)}
