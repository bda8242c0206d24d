"""prepare-teacher: turn a trained teacher into a generic teacher for a pool of students (GTN, METHODS.md §5).

Runs at the teacher owner's side, on the owner's labelled data (``prepare_teacher.data``; the demo's
private training split). Starting from ``prepare_teacher.teacher``, the teacher is fine-tuned with
its task loss plus a KD-compatibility term toward sub-students sampled (sandwich rule) from a
weight-sharing supernet of the pool (``prepare_teacher.families`` × ``width_multipliers`` ×
``depths``), while the supernet learns from the teacher by KD (docs/methods.md, "Generic teacher").

Outputs in ``RUN/prepare-teacher/``: ``teacher.pt`` — a normal kd3 teacher checkpoint (same
architecture, so every later stage uses it unchanged: ``score.teacher`` / ``evaluate.teacher`` =
``{run}/prepare-teacher/teacher.pt``) whose ``generic_teacher`` entry names the pool and the
settings; ``metrics.jsonl`` (one line per epoch); with ``export_students``, ``students/<name>.pt``:
every pool member extracted from the supernet as an ordinary registry model (BatchNorm statistics
recalibrated on the owner's data). An unfinished folder resumed with ``--resume`` starts over (the
stage takes minutes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from kd3 import layout
from kd3.config import PipelineConfig, require_file, resolve_path
from kd3.data.demo import random_affine
from kd3.data.images import as_nchw_uint8, prepare_uint8
from kd3.errors import Kd3Error
from kd3.inference import batch_logits
from kd3.methods.gtn import GTNSettings, StudentPool, StudentSupernet, prepare_generic_teacher, recalibrate_bn
from kd3.models import ModelMeta, build_model, check_checkpoint_code, load_model, save_checkpoint
from kd3.progress import Progress
from kd3.runs import StageDir, append_jsonl, file_fingerprint

log = logging.getLogger(__name__)

NAME = layout.PREPARE_TEACHER
SUMMARY = "generic teacher (GTN): fine-tune the teacher once so it distils well into every student of a pool"
SECTIONS = ("prepare_teacher",)
TEACHER, STUDENTS, METRICS = layout.GENERIC_TEACHER, layout.POOL_STUDENTS, layout.METRICS


def _paths(cfg: PipelineConfig, run_dir: Path) -> dict[str, Optional[Path]]:
    p = cfg.prepare_teacher
    return {"teacher": resolve_path(p.teacher, run_dir), "data": resolve_path(p.data, run_dir),
            "eval_data": resolve_path(p.eval_data, run_dir) if p.eval_data else None}


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    paths = _paths(cfg, run_dir)
    hints = {"teacher": "a kd3 teacher checkpoint, e.g. the demo-data stage's teacher.pt",
             "data": "the owner's labelled data: .npz with uint8 images and labels (kd3 demo-data writes one)",
             "eval_data": "an .npz like data, or prepare_teacher.eval_data=null"}
    for key, path in paths.items():
        if path is not None:
            require_file(cfg, f"prepare_teacher.{key}", path, hints[key])
    check_checkpoint_code(paths["teacher"])
    return {key: file_fingerprint(path) for key, path in paths.items() if path is not None}


def _labelled(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
    except (KeyError, ValueError, OSError) as exc:
        raise Kd3Error(f"{path}: expected an .npz with 'images' (uint8) and 'labels' ({exc})") from None
    try:
        x = as_nchw_uint8(images)
    except ValueError as exc:
        raise Kd3Error(f"{path}: {exc}") from None
    y = torch.from_numpy(labels.astype(np.int64))
    if len(y) != len(x) or len(y) < 2 or y.min() < 0 or y.max() >= num_classes:
        raise Kd3Error(f"{path}: needs at least 2 images with one label each in [0, {num_classes - 1}]")
    return x, y


def _accuracy(model: torch.nn.Module, meta: ModelMeta, images: torch.Tensor, labels: torch.Tensor,
              device: torch.device) -> float:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([batch_logits(model, meta.input, images[i:i + 512], device)
                            for i in range(0, len(images), 512)])
    return float((logits.argmax(1) == labels).float().mean())


def pool_from_config(cfg: PipelineConfig) -> StudentPool:
    p = cfg.prepare_teacher
    return StudentPool(families=tuple(p.families), widths=tuple(p.width_multipliers), depths=tuple(p.depths),
                       small_cnn_widths=tuple(p.small_cnn_widths), resnet_widths=tuple(p.resnet_widths))


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    from kd3.runtime import configure

    device = configure(cfg.run)
    p = cfg.prepare_teacher
    paths = _paths(cfg, out.run_dir)
    teacher, meta, _ = load_model(paths["teacher"], device)
    spec = meta.input
    images, labels = _labelled(paths["data"], meta.num_classes)
    evaluation = _labelled(paths["eval_data"], meta.num_classes) if paths["eval_data"] else None
    before = _accuracy(teacher, meta, *evaluation, device) if evaluation else None
    pool = pool_from_config(cfg)
    supernet = StudentSupernet(pool, meta.num_classes, spec.channels).to(device)
    pixels = (prepare_uint8(images, spec).float() / 255.0).to(device)
    labels_dev = labels.to(device)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)

    def transform(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if p.augment:  # the demo teacher's augmentation draws on CPU, seeded
            x = random_affine(x.cpu(), gen).to(device)
        return (x - mean) / std

    metrics = out.path / METRICS
    metrics.unlink(missing_ok=True)  # an unfinished run starts over

    def on_epoch(record: dict) -> None:
        append_jsonl(metrics, record)
        log.info(f"[{NAME}] epoch {record['epoch'] + 1}/{p.epochs}: teacher CE {record['teacher_ce']:.3f} "
                 f"compat {record['compat']:.3f} supernet KD {record['super_kd']:.3f} "
                 f"teacher train acc {record['teacher_train_acc']:.3f}")

    settings = GTNSettings(epochs=p.epochs, batch_size=p.batch_size, teacher_lr=p.teacher_lr,
                           supernet_lr=p.supernet_lr, momentum=p.momentum, weight_decay=p.weight_decay,
                           temperature=p.temperature, compat_weight=p.compat_weight,
                           student_ce_weight=p.student_ce_weight, random_subnets=p.random_subnets, seed=cfg.run.seed,
                           warmup_epochs=p.warmup_epochs)
    members = pool.members()
    log.info(f"[{NAME}] {meta.arch} teacher, pool of {len(members)} students "
             f"({', '.join(p.families)}; widths ×{p.width_multipliers}; depths {p.depths}), {len(labels)} labelled "
             f"images, {p.epochs} epochs")
    records = prepare_generic_teacher(
        teacher, supernet, pixels, labels_dev, settings, transform, on_epoch,
        batches=lambda starts: Progress(starts, f"[{NAME}] steps", unit="batch"))
    after = _accuracy(teacher, meta, *evaluation, device) if evaluation else None
    pool_models = {c.name: dict(zip(("arch", "options"), pool.registry_model(c))) for c in members}
    generic = {"pool": pool_models, "source_teacher": str(paths["teacher"]),
               "source_teacher_sha256": out.inputs["teacher"], "data": str(paths["data"]),
               "settings": cfg.section("prepare_teacher"), "eval_top1_before": before, "eval_top1_after": after}
    save_checkpoint(out.path / TEACHER, teacher, meta, generic_teacher=generic,
                    trained_on=f"generic-teacher preparation on {paths['data'].name} (from {paths['teacher']})")
    counts: dict[str, Any] = {"output": str(out.path / TEACHER), "pool_size": len(members),
                              "teacher_eval_top1_before": before, "teacher_eval_top1_after": after,
                              "final": records[-1]}
    if p.export_students:
        counts["students_eval_top1"] = _export_students(supernet, pool, meta, pixels, mean, std, evaluation,
                                                        out.path / STUDENTS, p.batch_size, device)
    if before is not None:
        log.info(f"[{NAME}] teacher top-1 on {paths['eval_data'].name}: {before:.4f} before, {after:.4f} after")
    return counts


def _export_students(supernet: StudentSupernet, pool: StudentPool, meta: ModelMeta, pixels: torch.Tensor,
                     mean: torch.Tensor, std: torch.Tensor, evaluation, folder: Path, batch_size: int,
                     device: torch.device) -> dict[str, Optional[float]]:
    """Every pool member as an ordinary registry model, BN statistics recalibrated on the owner's data."""
    folder.mkdir(parents=True, exist_ok=True)
    accuracies = {}
    for cfg in pool.members():
        arch, options = pool.registry_model(cfg)
        model = build_model(arch, meta.num_classes, meta.input.channels, options).to(device)
        model.load_state_dict(supernet.extract_state(cfg, model.state_dict()))
        recalibrate_bn(model, ((pixels[i:i + batch_size] - mean) / std for i in range(0, len(pixels), batch_size)))
        student_meta = ModelMeta(arch=arch, options=options, num_classes=meta.num_classes,
                                 class_names=meta.class_names, input=meta.input)
        save_checkpoint(folder / f"{cfg.name}.pt", model, student_meta,
                        trained_on="generic-teacher supernet (KD from the teacher on the owner's data)")
        accuracies[cfg.name] = _accuracy(model, student_meta, *evaluation, device) if evaluation else None
    return accuracies
