"""select: one selection pass over the scored pool → a manifest of chosen samples.

Output ``RUN/select/manifest.parquet``: one row per scored sample with uid, url, shard, key,
teacher_label, teacher_class, teacher_conf and ``selected``; ``meta.json`` holds per-class counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd3.config import PipelineConfig
from kd3.methods.selection import select_by_teacher_confidence
from kd3.runs import StageDir, atomic_path, require_complete, stage_input_fingerprint
from kd3.stages.score import load_teacher_outputs

NAME = "select"
SUMMARY = "choose web samples (teacher confidence rule) and write the selection manifest"
SECTIONS = ("select",)
MANIFEST = "manifest.parquet"


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    require_complete(run_dir, "score", NAME)
    return {"score": stage_input_fingerprint(run_dir, "score")}


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    scores = load_teacher_outputs(out.run_dir)
    result = select_by_teacher_confidence(scores.logits, cfg.select.threshold, cfg.select.per_class_cap)
    manifest = scores.frame[["uid", "url", "shard", "key", "teacher_label", "teacher_conf"]].copy()
    names = scores.teacher.class_names
    manifest["teacher_class"] = manifest["teacher_label"].map(lambda k: names[int(k)])
    manifest["selected"] = result.mask.numpy()
    with atomic_path(out.path / MANIFEST) as tmp:
        manifest.to_parquet(tmp, index=False)
    chosen = manifest[manifest["selected"]]
    per_class = {names[k]: int(n) for k, n in enumerate(result.selected_per_class.tolist())}
    print(f"[{NAME}] selected {len(chosen)} of {len(manifest)} samples (teacher confidence ≥ {cfg.select.threshold}); "
          f"per class: {per_class}")
    if result.fallback_used:
        print(f"[{NAME}] warning: nothing passed the threshold; kept the most confident sample(s) instead")
    return {"pool": len(manifest), "selected": len(chosen), "selected_per_class": per_class,
            "fallback_used": bool(result.fallback_used)}
