"""select: one stand-alone selection pass over the scored pool → a manifest of chosen samples.

Runs the registered selector ``select.selector`` (parameters ``selectors.<name>``; the same rules
training runs every epoch) once, with ``epoch`` unset: e.g. ``teacher_confidence`` (teacher
max-softmax ≥ threshold, optional per-class cap) or ``kd3_dynamic`` with a fixed
``selectors.kd3_dynamic.alpha`` and, for α < 1, a student checkpoint (``select.student``).
Output ``RUN/select/manifest.parquet`` with one row per scored sample, in the same schema as the
train stage's per-epoch manifests (epoch = -1 for a stand-alone pass) plus ``teacher_class``;
meta.json holds per-class counts. Training does not read it: it selects for itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kd3 import layout
from kd3.config import PipelineConfig, require_file, resolve_path
from kd3.data.exclusions import exclude_inputs, excluded_mask
from kd3.data.manifest import selection_manifest
from kd3.data.score_cache import load_teacher_outputs, require_score
from kd3.data.shards import check_shards_unchanged, list_shards
from kd3.errors import Kd3Error
from kd3.inference import pool_logits
from kd3.methods.selectors import SELECTORS, SelectionInputs, run_selector
from kd3.models import check_checkpoint_code, load_model
from kd3.runs import StageDir, atomic_path, file_fingerprint, stage_input_fingerprint
from kd3.runtime import configure

log = logging.getLogger(__name__)

NAME = "select"
SUMMARY = "one pass of a registered selector over the scored pool → manifest of chosen samples"
SECTIONS = ("select", "selectors")
#: the pool pass for a student-aware selector runs at score.batch_size
READS = ("score",)
STANDALONE_EPOCH = -1


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    require_score(run_dir, NAME)
    inputs = {"score": stage_input_fingerprint(run_dir, layout.SCORE), **exclude_inputs(cfg, "select.exclude", run_dir)}
    selector = SELECTORS.get(cfg.select.selector)
    if selector.needs_student(cfg.selector_params(selector.name)):
        student = require_file(cfg, "select.student", resolve_path(cfg.select.student, run_dir),
                               "train a student first or point select.student at a kd3 student checkpoint")
        check_checkpoint_code(student)
        check_shards_unchanged(run_dir, NAME)  # the student runs over the pool's images
        inputs["student"] = file_fingerprint(student)
    return inputs


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    scores = load_teacher_outputs(out.run_dir)
    selector = SELECTORS.get(cfg.select.selector)
    params = cfg.selector_params(selector.name)
    student_logits = None
    if selector.needs_student(params):
        device = configure(cfg.run)
        student, meta, _ = load_model(resolve_path(cfg.select.student, out.run_dir), device)
        student_logits = pool_logits(student, meta.input, meta.num_classes, list_shards(out.run_dir / layout.DOWNLOAD),
                                     scores.uid_to_row, cfg.score.batch_size, cfg.score.num_workers, device,
                                     scores.pixels, f"[{NAME}] student over the pool")
    excluded = excluded_mask(cfg, "select.exclude", out.run_dir, list(scores.frame["uid"]))
    if excluded.all():
        raise Kd3Error(f"{cfg.source}: select.exclude lists every scored sample; nothing is left to select")
    if excluded.any():
        log.info(f"[{NAME}] leaving out {int(excluded.sum())} of {len(excluded)} samples listed in select.exclude")
    try:
        result = run_selector(selector, params, SelectionInputs(teacher_logits=scores.logits,
                                                                student_logits=student_logits, seed=cfg.run.seed,
                                                                bn_score=scores.bn_score,
                                                                bn_per_layer=scores.bn_per_layer),
                              torch.from_numpy(~excluded) if excluded.any() else None)
    except ValueError as exc:
        raise Kd3Error(f"select.selector {selector.name}: {exc}") from None
    manifest = selection_manifest(scores.frame, STANDALONE_EPOCH, result, result.alpha, student_logits, None)
    names = scores.teacher.class_names
    manifest["teacher_class"] = manifest["teacher_label"].map(lambda k: names[int(k)])
    with atomic_path(out.path / layout.SELECT_MANIFEST) as tmp:
        manifest.to_parquet(tmp, index=False)
    n_selected = int(manifest["selected"].sum())
    per_class = {names[k]: int(n) for k, n in enumerate(result.selected_per_class.tolist())}
    described = ", ".join(f"{k}={v}" for k, v in params.model_dump().items())
    log.info(f"[{NAME}] selected {n_selected} of {len(manifest)} samples ({selector.name}"
             f"{': ' + described if described else ''}); per class: {per_class}")
    if result.fallback_used:
        log.warning(f"[{NAME}] warning: nothing passed the threshold; kept the most confident sample(s) instead")
    if result.dominant_class is not None:
        log.warning(f"[{NAME}] warning: class {names[result.dominant_class]!r} holds most of the confident samples")
    return {"pool": len(manifest), "excluded": int(excluded.sum()), "selected": n_selected, "selected_per_class": per_class,
            "fallback_used": bool(result.fallback_used),
            "dominant_class": None if result.dominant_class is None else names[result.dominant_class]}
