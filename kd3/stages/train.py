"""train: distil the teacher into a student on web samples.

``train.method=kd``: KL(p_T‖p_S) on the score stage's cached teacher logits over the select
stage's manifest (the teacher is not even loaded). ``train.method=kd3``: KD³ (METHODS.md §1) —
every epoch the student runs over the whole pool, its logits are combined with the cached
teacher logits (the teacher is never re-run for selection), the epoch's selection is computed and
the epoch trains only on it with feature alignment, the shared teacher classifier and the
MixDistribution contrastive block (the teacher runs only for its feature maps).

Outputs in ``RUN/train/``: ``epoch_XXX.pt`` per epoch and ``last.pt`` (student weights + metadata
+ trainer state: optimizer, scheduler, epoch, RNG, training-only modules, config),
``metrics.jsonl`` (one line per epoch) and, for KD³, ``selection/epoch_XXX.parquet`` (one row per
pool sample). ``--resume`` continues after the last finished epoch with the same data order and
the same selections as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from kd3.config import PipelineConfig
from kd3.data.images import normalize
from kd3.data.shards import ShardImages, image_loader, list_shards
from kd3.errors import Kd3Error
from kd3.inference import pool_logits
from kd3.data.manifest import selection_manifest
from kd3.methods.objectives import KD3Objective, KDObjective
from kd3.methods.selection import SelectionResult, alpha_schedule, select_dynamic
from kd3.models import InputSpec, ModelMeta, build_model, load_model, read_checkpoint, save_checkpoint
from kd3.models.checkpoints import load_state_dict_strict
from kd3.models.distilled import STUDENT_ARCH, distilled_from_teacher
from kd3.runs import (StageDir, append_jsonl, atomic_path, atomic_write_text, read_jsonl, require_complete,
                      stage_input_fingerprint)
from kd3.runtime import configure
from kd3.stages.score import TeacherOutputs, load_teacher_outputs
from kd3.stages.select import MANIFEST

NAME = "train"
SUMMARY = "train the student (plain KD or KD³ with per-epoch selection); checkpoint + metrics per epoch"
SECTIONS = ("train", "kd3")
SELECTION_DIR = "selection"


def output_name(cfg: PipelineConfig) -> str:
    """``RUN/<train.output>/``: "train" unless a variant run names its own folder."""
    return cfg.train.output


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    require_complete(run_dir, "score", NAME)
    inputs = {"score": stage_input_fingerprint(run_dir, "score")}
    if cfg.train.method == "kd" and cfg.train.data == "selected":
        require_complete(run_dir, "select", NAME + " (train.data=selected; use train.data=all to skip selection)")
        inputs["select"] = stage_input_fingerprint(run_dir, "select")
    if cfg.train.method == "kd3":
        teacher = Path(cfg.score.teacher.replace("{run}", str(run_dir)))
        if not teacher.is_file():
            raise Kd3Error(f"{cfg.source}: score.teacher: file not found: {teacher} "
                           "(KD³ needs the teacher's feature maps and classifier during training)")
    from kd3.models import MODELS

    MODELS.get(cfg.train.student.arch)  # fail before any work on an unknown architecture
    return inputs


def lr_factor(cfg: PipelineConfig, epoch: int) -> float:
    """Multiplier of train.lr for a 0-based epoch (schedules are per epoch, so resume is exact)."""
    t = cfg.train
    if t.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / t.epochs))
    if t.scheduler == "step":
        return 0.1 ** sum(epoch >= round(m * t.epochs) for m in t.step_milestones)
    return 1.0


def _static_rows(cfg: PipelineConfig, run_dir: Path, uid_to_row: dict[str, int]) -> dict[str, int]:
    if cfg.train.data == "all":
        return uid_to_row
    manifest = pd.read_parquet(run_dir / "select" / MANIFEST, columns=["uid", "selected"])
    chosen = manifest.loc[manifest["selected"], "uid"]
    return {uid: uid_to_row[uid] for uid in chosen if uid in uid_to_row}


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------- building
def student_input_spec(cfg: PipelineConfig, teacher: InputSpec) -> InputSpec:
    """The student's preprocessing: train.student_input where set, else the teacher's."""
    o = cfg.train.student_input
    channels = o.channels or teacher.channels
    mean = tuple(o.mean) if o.mean is not None else teacher.mean
    std = tuple(o.std) if o.std is not None else teacher.std
    if channels != teacher.channels and o.mean is None:
        # a channel change needs its own statistics; averaging the teacher's is the neutral guess
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    if len(mean) != channels or len(std) != channels:
        raise Kd3Error(f"{cfg.source}: train.student_input: mean/std need {channels} value(s) for {channels} channel(s)")
    return InputSpec(image_size=o.image_size or teacher.image_size, channels=channels, mean=mean, std=std)


def _build(cfg: PipelineConfig, run_dir: Path, scores: TeacherOutputs, device: torch.device):
    """Student model, its checkpoint metadata, the objective and (for KD³) the frozen teacher."""
    t, k = cfg.train, cfg.kd3
    teacher_meta = scores.teacher
    spec = student_input_spec(cfg, teacher_meta.input)
    backbone = build_model(t.student.arch, teacher_meta.num_classes, spec.channels, t.student.options)
    if t.method == "kd":
        meta = ModelMeta(arch=t.student.arch, options=t.student.options, num_classes=teacher_meta.num_classes,
                         class_names=teacher_meta.class_names, input=spec)
        return backbone.to(device), meta, KDObjective(backbone, t.temperature).to(device), None
    teacher, loaded_meta, _ = load_model(Path(cfg.score.teacher.replace("{run}", str(run_dir))), device)
    if not getattr(teacher, "supports_feature_alignment", True):
        raise Kd3Error(f"teacher {loaded_meta.arch!r} exposes no feature map that reproduces its logits "
                       "(e.g. a class-token ViT), so KD³'s alignment is unavailable; use train.method=kd "
                       "or an average-pooled teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        probe = torch.zeros(1, loaded_meta.input.channels, loaded_meta.input.image_size,
                            loaded_meta.input.image_size, device=device)
        map_shape = tuple(int(v) for v in teacher.forward_features(probe).shape[1:])
    if k.shared_classifier:
        student = distilled_from_teacher(backbone, teacher, map_shape, k.projector_factor)
        meta = ModelMeta(arch=STUDENT_ARCH, num_classes=teacher_meta.num_classes, class_names=teacher_meta.class_names,
                         input=spec, options={
                             "student": {"arch": t.student.arch, "options": dict(t.student.options)},
                             "teacher": {"arch": loaded_meta.arch, "options": dict(loaded_meta.options),
                                         "in_channels": loaded_meta.input.channels},
                             "teacher_map_shape": list(map_shape), "projector_factor": k.projector_factor})
    else:
        student = backbone
        meta = ModelMeta(arch=t.student.arch, options=t.student.options, num_classes=teacher_meta.num_classes,
                         class_names=teacher_meta.class_names, input=spec)
    objective = KD3Objective(
        student, teacher, map_shape, feature_alignment=k.feature_alignment, feature_weight=k.feature_weight,
        mixdistribution=k.mixdistribution, mix_beta=k.mix_beta, mix_p=k.mix_p,
        contrastive_weight=k.contrastive_weight, contrastive_temperature=k.contrastive_temperature,
        embed_dim=k.embed_dim, teacher_contrastive=k.teacher_contrastive, kl_weight=k.kl_weight,
        kl_temperature=k.kl_temperature, projector_factor=k.projector_factor)
    return student.to(device), meta, objective.to(device), teacher


def _training_only_state(objective: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The objective's own modules (projector, embedding heads), without the student's weights."""
    return {k: v for k, v in objective.state_dict().items() if not k.startswith("student.")}


# ---------------------------------------------------------------------------------------- selection
def _epoch_selection(cfg: PipelineConfig, epoch: int, teacher_logits: torch.Tensor,
                     student_logits: Optional[torch.Tensor]) -> tuple[SelectionResult, float]:
    k = cfg.kd3
    if k.selection == "all":
        n, classes = teacher_logits.shape
        conf, labels = teacher_logits.softmax(1).max(1)
        per_class = torch.bincount(labels, minlength=classes)
        return SelectionResult(mask=torch.ones(n, dtype=torch.bool), labels=labels, confidences=conf,
                               thresholds=torch.zeros(classes), counts=per_class, selected_per_class=per_class,
                               fallback_used=False, dominant_class=None), 1.0
    alpha = 1.0 if k.selection == "teacher" else alpha_schedule(epoch, cfg.train.epochs, k.alpha_mode)
    result = select_dynamic(teacher_logits, student_logits if alpha < 1 else None, alpha, tau=k.tau,
                            threshold_floor=k.threshold_floor, max_class_share=k.max_class_share)
    return result, alpha


# ------------------------------------------------------------------------------------------- the run
def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    device = configure(cfg.run)
    t = cfg.train
    run_dir = out.run_dir
    scores = load_teacher_outputs(run_dir)
    pool_rows = scores.uid_to_row
    student, meta, objective, teacher = _build(cfg, run_dir, scores, device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, e))
    start_epoch = 0
    last = out.path / "last.pt"
    if out.resumed and last.exists():
        payload = read_checkpoint(last)
        load_state_dict_strict(student, payload["state_dict"], str(last))
        trainer = payload["trainer"]
        extra = trainer.get("training_only", {})
        if extra:
            objective.load_state_dict({**{f"student.{k}": v for k, v in payload["state_dict"].items()}, **extra})
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        _set_rng_state(trainer["rng"])
        start_epoch = trainer["epoch"] + 1
        print(f"[{NAME}] resuming after epoch {start_epoch} from {last}")
    # drop records of an epoch that was interrupted after logging but before its checkpoint
    metrics_path = out.path / "metrics.jsonl"
    kept = [r for r in read_jsonl(metrics_path) if r.get("epoch", -1) < start_epoch]
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    shards = list_shards(run_dir / "download")
    teacher_logits = scores.logits
    names = meta.class_names
    static_rows = _static_rows(cfg, run_dir, pool_rows) if t.method == "kd" else None
    if static_rows is not None and not static_rows:
        raise Kd3Error(f"no training samples: the selection in {run_dir / 'select'} is empty; "
                       "lower select.threshold or use train.data=all")
    described = (f"plain KD (τ={t.temperature}) on cached teacher logits, {len(static_rows)} samples"
                 if t.method == "kd" else
                 f"KD³ over a pool of {len(pool_rows)} (selection={cfg.kd3.selection}, "
                 f"shared classifier={'on' if cfg.kd3.shared_classifier else 'off'})")
    print(f"[{NAME}] {t.student.arch} student, {t.epochs} epochs, {described}")
    if t.method == "kd3":
        (out.path / SELECTION_DIR).mkdir(exist_ok=True)

    for epoch in range(start_epoch, t.epochs):
        started = time.monotonic()
        record: dict[str, Any] = {"epoch": epoch}
        selection = None
        student_logits = None
        if t.method == "kd3":
            if cfg.kd3.selection == "dynamic":
                student_logits = pool_logits(student, meta.input, meta.num_classes, shards, pool_rows,
                                             cfg.score.batch_size, t.num_workers, device)
            selection, alpha = _epoch_selection(cfg, epoch, teacher_logits, student_logits)
            chosen = set(torch.nonzero(selection.mask).flatten().tolist())
            rows = {uid: r for uid, r in pool_rows.items() if r in chosen}
            record.update(alpha=alpha, selected=len(rows),
                          selected_per_class={names[c]: int(n) for c, n in enumerate(selection.selected_per_class)},
                          confident_per_class={names[c]: int(n) for c, n in enumerate(selection.counts)},
                          class_thresholds=[round(float(v), 6) for v in selection.thresholds],
                          fallback_used=bool(selection.fallback_used),
                          dominant_class=None if selection.dominant_class is None else names[selection.dominant_class])
            if selection.fallback_used:
                print(f"[{NAME}] warning: epoch {epoch + 1}: nothing passed the thresholds; "
                      f"trained on the {len(rows)} most confident sample(s)")
            if selection.dominant_class is not None:
                share = selection.counts[selection.dominant_class].item() / max(int(selection.counts.sum()), 1)
                print(f"[{NAME}] warning: epoch {epoch + 1}: class {names[selection.dominant_class]!r} holds "
                      f"{share:.0%} of the confident samples; other classes' thresholds fall towards 0 "
                      "(see kd3.threshold_floor / kd3.max_class_share)")
        else:
            rows = static_rows

        student.train()
        objective.train()
        generator = torch.Generator().manual_seed(cfg.run.seed * 100_003 + epoch)
        # KD³ runs the teacher on its own view when its preprocessing differs from the student's
        teacher_view = scores.teacher.input if (teacher is not None and scores.teacher.input != meta.input) else None
        dataset = ShardImages(shards, meta.input, uid_to_row=rows, shuffle=True, seed=cfg.run.seed, epoch=epoch,
                              teacher_spec=teacher_view)
        weights_last = torch.full((len(pool_rows),), float("nan"))
        sums: dict[str, float] = {}
        seen = agree = 0
        loader = image_loader(dataset, t.batch_size, t.num_workers)
        for batch in tqdm(loader, desc=f"[{NAME}] epoch {epoch + 1}/{t.epochs}", unit="batch", leave=False,
                          disable=None, total=math.ceil(len(rows) / t.batch_size)):
            x = normalize(batch["image"].to(device), meta.input)
            x_t = normalize(batch["teacher_image"].to(device), teacher_view) if teacher_view is not None else x
            z_t = teacher_logits[batch["row"]].to(device)
            step = objective(x, x_t, z_t, generator)
            optimizer.zero_grad(set_to_none=True)
            step.loss.backward()
            optimizer.step()
            n = len(x)
            seen += n
            for name, value in {"loss": step.loss.item(), **{f"loss_{k}": v for k, v in step.terms.items()}}.items():
                sums[name] = sums.get(name, 0.0) + value * n
            if step.weights is not None:
                weights_last[batch["row"]] = step.weights.detach().float().cpu()
            with torch.no_grad():
                agree += (student(x).argmax(1) == z_t.argmax(1)).sum().item() if t.method == "kd3" else 0
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record.update({name: total / max(seen, 1) for name, total in sums.items()})
        if t.method == "kd3":
            trained = ~torch.isnan(weights_last)
            record["mean_weight"] = float(weights_last[trained].mean()) if trained.any() else None
            record["train_agreement"] = agree / max(seen, 1)
            frame = selection_manifest(scores.frame, epoch, selection, record["alpha"], student_logits, weights_last)
            with atomic_path(out.path / SELECTION_DIR / f"epoch_{epoch:03d}.parquet") as tmp:
                frame.to_parquet(tmp, index=False)
        record.update(lr=lr, samples=seen, seconds=round(time.monotonic() - started, 2))
        append_jsonl(metrics_path, record)
        trainer_state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": _rng_state(), "training_only": _training_only_state(objective),
                         "config": {"train": cfg.section("train"), "kd3": cfg.section("kd3")}, "seed": cfg.run.seed}
        epoch_path = out.path / f"epoch_{epoch:03d}.pt"
        save_checkpoint(epoch_path, student, meta, trainer=trainer_state)
        with atomic_path(last) as tmp:
            shutil.copyfile(epoch_path, tmp)
        parts = " ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss_"))
        extra = f" α {record['alpha']:.3f} selected {record['selected']}" if t.method == "kd3" else ""
        print(f"[{NAME}] epoch {epoch + 1}/{t.epochs}: loss {record['loss']:.4f} ({parts}){extra} "
              f"({record['seconds']:.1f}s)")
    final = read_jsonl(metrics_path)[-1]
    return {"method": t.method, "epochs": t.epochs, "final_loss": final["loss"],
            "final_selected": final.get("selected", len(static_rows or {}))}
