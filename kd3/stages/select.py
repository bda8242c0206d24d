"""select: one selection pass over the scored pool → a manifest of chosen samples.

Rules: ``teacher_confidence`` (teacher max-softmax ≥ ``select.threshold``, optional per-class
cap) or ``dynamic`` (KD³'s rule with a given student checkpoint and α: combined logits,
class-adaptive thresholds from ``kd3.tau``, guards from the kd3 section). Output
``RUN/select/manifest.parquet`` with one row per scored sample, in the same schema as KD³'s
per-epoch manifests (epoch = -1 for a stand-alone pass) plus ``teacher_class``; meta.json holds
per-class counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd3.config import PipelineConfig, require_file, resolve_path
from kd3.data.manifest import selection_manifest
from kd3.data.shards import list_shards
from kd3.inference import pool_logits
from kd3.methods.selection import select_by_teacher_confidence, select_dynamic
from kd3.models import load_model
from kd3.runs import StageDir, atomic_path, file_fingerprint, require_complete, stage_input_fingerprint
from kd3.runtime import configure
from kd3.stages.score import load_teacher_outputs

NAME = "select"
SUMMARY = "choose web samples (teacher confidence, or KD³'s rule with a student and α) → manifest"
SECTIONS = ("select", "kd3")
MANIFEST = "manifest.parquet"
STANDALONE_EPOCH = -1


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    require_complete(run_dir, "score", NAME)
    inputs = {"score": stage_input_fingerprint(run_dir, "score")}
    if cfg.select.rule == "dynamic" and cfg.select.student is not None:
        student = require_file(cfg, "select.student", resolve_path(cfg.select.student, run_dir),
                               "train a student first or point select.student at a kd3 student checkpoint")
        inputs["student"] = file_fingerprint(student)
    return inputs


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    sel = cfg.select
    scores = load_teacher_outputs(out.run_dir)
    student_logits = None
    if sel.rule == "teacher_confidence":
        result = select_by_teacher_confidence(scores.logits, sel.threshold, sel.per_class_cap)
        alpha, described = 1.0, f"teacher confidence ≥ {sel.threshold}"
    else:
        if sel.student is not None and sel.alpha < 1:
            device = configure(cfg.run)
            student, meta, _ = load_model(resolve_path(sel.student, out.run_dir), device)
            student_logits = pool_logits(student, meta.input, meta.num_classes, list_shards(out.run_dir / "download"),
                                         scores.uid_to_row, cfg.score.batch_size, cfg.score.num_workers, device)
        k = cfg.kd3
        result = select_dynamic(scores.logits, student_logits, sel.alpha, tau=k.tau,
                                threshold_floor=k.threshold_floor, max_class_share=k.max_class_share)
        alpha, described = sel.alpha, f"KD³ dynamic rule, α = {sel.alpha}, τ = {k.tau}"
    manifest = selection_manifest(scores.frame, STANDALONE_EPOCH, result, alpha, student_logits, None)
    names = scores.teacher.class_names
    manifest["teacher_class"] = manifest["teacher_label"].map(lambda k: names[int(k)])
    with atomic_path(out.path / MANIFEST) as tmp:
        manifest.to_parquet(tmp, index=False)
    n_selected = int(manifest["selected"].sum())
    per_class = {names[k]: int(n) for k, n in enumerate(result.selected_per_class.tolist())}
    print(f"[{NAME}] selected {n_selected} of {len(manifest)} samples ({described}); per class: {per_class}")
    if result.fallback_used:
        print(f"[{NAME}] warning: nothing passed the threshold; kept the most confident sample(s) instead")
    if result.dominant_class is not None:
        print(f"[{NAME}] warning: class {names[result.dominant_class]!r} holds most of the confident samples")
    return {"pool": len(manifest), "selected": n_selected, "selected_per_class": per_class,
            "fallback_used": bool(result.fallback_used),
            "dominant_class": None if result.dominant_class is None else names[result.dominant_class]}
