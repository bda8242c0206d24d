"""evaluate: teacher and students on labelled evaluation sets (the private test split by default).

For every dataset and model: top-1 / top-5 accuracy, ECE, and for students top-1 agreement with
the teacher and KL(p_T ‖ p_S) at τ = 1. Outputs ``RUN/evaluate/report.json``, ``report.md`` and a
printed table; the report states how far each student trails the teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd3.config import PipelineConfig, require_file, resolve_path
from kd3.data.images import as_nchw_uint8
from kd3.errors import Kd3Error
from kd3.inference import array_logits
from kd3.methods.fidelity import fidelity_report
from kd3.models import load_model
from kd3.runs import StageDir, atomic_write_json, atomic_write_text, file_fingerprint
from kd3.runtime import configure

NAME = "evaluate"
SUMMARY = "accuracy, agreement, KL and ECE of teacher and students on the evaluation sets"
SECTIONS = ("evaluate",)


def _paths(cfg: PipelineConfig, run_dir: Path) -> dict[str, Path]:
    e = cfg.evaluate
    paths = {"teacher": resolve_path(e.teacher, run_dir)}
    paths.update({f"students.{name}": resolve_path(p, run_dir) for name, p in e.students.items()})
    paths.update({f"datasets.{d.name}": resolve_path(d.path, run_dir) for d in e.datasets})
    return paths


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    inputs = {}
    for key, path in _paths(cfg, run_dir).items():
        require_file(cfg, f"evaluate.{key}", path, "run the earlier stages first or fix the path")
        inputs[key] = file_fingerprint(path)
    return inputs


def load_eval_set(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An .npz with ``images`` (uint8) and ``labels`` → (uint8 [N,C,H,W], int64 [N])."""
    try:
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
    except KeyError as exc:
        raise Kd3Error(f"{path}: evaluation .npz needs arrays 'images' and 'labels' (missing {exc})") from None
    except Exception as exc:
        raise Kd3Error(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None
    try:
        tensor = as_nchw_uint8(images)
    except ValueError as exc:
        raise Kd3Error(f"{path}: {exc}") from None
    if len(labels) != len(tensor):
        raise Kd3Error(f"{path}: {len(tensor)} images but {len(labels)} labels")
    return tensor, torch.from_numpy(labels.astype(np.int64))


def _format_table(rows: list[dict[str, Any]]) -> str:
    header = ["dataset", "model", "top1", "top5", "ece", "agreement", "kl", "Δtop1 vs teacher"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["dataset"], r["model"]] + [
            "—" if r.get(k) is None else f"{r[k]:.4f}" for k in ("top1", "top5", "ece", "agreement", "kl")]
        cells.append("—" if r.get("delta_top1") is None else f"{r['delta_top1']:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    device = configure(cfg.run)
    e = cfg.evaluate
    paths = _paths(cfg, out.run_dir)
    teacher, teacher_meta, _ = load_model(paths["teacher"], device)
    students = {name: load_model(paths[f"students.{name}"], device) for name in e.students}
    rows: list[dict[str, Any]] = []
    for dataset in e.datasets:
        images, labels = load_eval_set(paths[f"datasets.{dataset.name}"])
        if int(labels.max()) >= teacher_meta.num_classes or int(labels.min()) < 0:
            raise Kd3Error(f"{paths[f'datasets.{dataset.name}']}: labels outside 0..{teacher_meta.num_classes - 1}")
        z_t = array_logits(teacher, teacher_meta.input, images, e.batch_size, device)
        teacher_row = {"dataset": dataset.name, "model": "teacher", "n": len(labels),
                       **fidelity_report(z_t, None, labels)}
        rows.append(teacher_row)
        for name, (model, meta, _) in students.items():
            z_s = array_logits(model, meta.input, images, e.batch_size, device)
            report = fidelity_report(z_s, z_t, labels)
            rows.append({"dataset": dataset.name, "model": name, "n": len(labels), **report,
                         "delta_top1": report["top1"] - teacher_row["top1"]})
    table = _format_table(rows)
    atomic_write_json(out.path / "report.json", {"rows": rows, "checkpoints": {k: str(v) for k, v in paths.items()}})
    atomic_write_text(out.path / "report.md", f"# kd3 evaluation ({out.run_dir})\n\n{table}\n")
    print(table)
    for r in rows:
        if r["model"] != "teacher":
            chance = 1.0 / teacher_meta.num_classes
            print(f"[{NAME}] {r['model']} on {r['dataset']}: top-1 {r['top1']:.4f} (chance {chance:.2f}), "
                  f"trails the teacher by {-r['delta_top1'] * 100:.2f} points, agreement {r['agreement']:.4f}")
    return {"rows": len(rows), "results": rows, "output": str(out.path / "report.md")}
