"""train: distil the teacher into a student on web samples.

``train.method=kd``: KL(p_T‖p_S) on the score stage's cached teacher logits over the select
stage's manifest (the teacher is not even loaded). ``train.method=kd3``: KD³ (METHODS.md §1) —
every epoch the student runs over the whole pool, its logits are combined with the cached
teacher logits (the teacher is never re-run for selection), the epoch's selection is computed and
the epoch trains only on it with feature alignment, the shared teacher classifier and the
MixDistribution contrastive block (the teacher runs only for its feature maps).

Either method can add the ND loss (``train.extra_losses: [nd]``, METHODS.md §4) and keep weight
averages of the student (section ``averaging``: WAKD, SMA, SWAD; METHODS.md §2). The averages
live on the training device, are updated after optimiser steps and are saved in every
checkpoint's trainer state; ``kd3 average`` writes them as student checkpoints. SWAD holds out
``averaging.val_fraction`` of the pool (by uid hash; never trained on, listed in
``validation.parquet``) and evaluates the student on it every ``averaging.swad_eval_every`` steps.

Outputs in ``RUN/train/``: ``epoch_XXX.pt`` per epoch and ``last.pt`` (student weights + metadata
+ trainer state: optimizer, scheduler, epoch, global step, RNG, training-only modules, averages,
config), ``metrics.jsonl`` (one line per epoch) and, for KD³, ``selection/epoch_XXX.parquet`` (one
row per pool sample; held-out validation samples are never selected). ``--resume`` continues after
the last finished epoch with the same data order, selections and averages as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
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

from kd3.config import PipelineConfig, resolve_path
from kd3.data.images import normalize
from kd3.data.shards import ShardImages, image_loader, list_shards
from kd3.errors import Kd3Error
from kd3.inference import pool_logits
from kd3.data.manifest import selection_manifest
from kd3.methods.averaging_tracker import TrainingAverages, map_tensors
from kd3.methods.fidelity import predictive_kl
from kd3.methods.nd import teacher_class_means
from kd3.methods.objectives import KD3Objective, KDObjective, WithND
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
SECTIONS = ("train", "kd3", "averaging")
SELECTION_DIR = "selection"
VALIDATION = "validation.parquet"


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
        teacher = resolve_path(cfg.score.teacher, run_dir)
        if not teacher.is_file():
            raise Kd3Error(f"{cfg.source}: score.teacher: file not found: {teacher} "
                           "(KD³ needs the teacher's feature maps and classifier during training)")
    if "nd" in cfg.train.extra_losses and cfg.train.nd_class_means == "teacher_checkpoint":
        _checkpoint_class_means(cfg, run_dir)  # fail before any work when they are missing
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


def validation_mask(uids: pd.Series, fraction: float) -> np.ndarray:
    """SWAD's held-out split over score-cache rows: bool [N], True for validation samples.

    The max(1, round(fraction·N)) rows with the smallest SHA-256("kd3-val:" + uid): deterministic,
    independent of row order, and a sample's membership depends only on its uid and the pool.
    """
    keys = np.array([hashlib.sha256(f"kd3-val:{uid}".encode()).hexdigest() for uid in uids])
    n_val = max(1, round(fraction * len(keys)))
    if n_val >= len(keys):
        raise Kd3Error(f"averaging.val_fraction={fraction} leaves no training sample in a pool of {len(keys)}; "
                       "lower it or drop swad from averaging.modes")
    mask = np.zeros(len(keys), dtype=bool)
    mask[np.argsort(keys, kind="stable")[:n_val]] = True
    return mask


def training_rows(cfg: PipelineConfig, scores: TeacherOutputs) -> tuple[dict[str, int], np.ndarray]:
    """(uid → score-cache row of every sample training may use, validation mask [N]).

    The pool minus SWAD's held-out split (no split without SWAD).
    """
    frame = scores.frame
    if "swad" in cfg.averaging.modes:
        held_out = validation_mask(frame["uid"], cfg.averaging.val_fraction)
    else:
        held_out = np.zeros(len(frame), dtype=bool)
    rows = {uid: i for i, uid in enumerate(frame["uid"]) if not held_out[i]}
    return rows, held_out


def _checkpoint_class_means(cfg: PipelineConfig, run_dir: Path) -> torch.Tensor:
    path = resolve_path(cfg.score.teacher, run_dir)
    means = read_checkpoint(path).get("class_means")
    if not isinstance(means, torch.Tensor) or means.dim() != 2 or not means.is_floating_point():
        raise Kd3Error(f"{path}: no 'class_means' tensor [K, D] for train.nd_class_means=teacher_checkpoint; "
                       "use train.nd_class_means=pseudo_labels")
    return means.float()


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
    nd = "nd" in t.extra_losses
    if t.method == "kd":
        meta = ModelMeta(arch=t.student.arch, options=t.student.options, num_classes=teacher_meta.num_classes,
                         class_names=teacher_meta.class_names, input=spec)
        objective = _with_extras(cfg, KDObjective(backbone, t.temperature, return_pooled=nd), backbone, scores)
        return backbone.to(device), meta, objective.to(device), None
    teacher, loaded_meta, _ = load_model(resolve_path(cfg.score.teacher, run_dir), device)
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
        kl_temperature=k.kl_temperature, projector_factor=k.projector_factor, return_pooled=nd)
    objective = _with_extras(cfg, objective, backbone, scores)
    return student.to(device), meta, objective.to(device), teacher


def _with_extras(cfg: PipelineConfig, objective: torch.nn.Module, backbone: torch.nn.Module,
                 scores: TeacherOutputs) -> torch.nn.Module:
    """Wrap the method's objective with the extra losses (ND: student backbone's pooled dim → D_T)."""
    t = cfg.train
    if "nd" not in t.extra_losses:
        return objective
    return WithND(objective, backbone.feature_dim, scores.features.shape[1], weight=t.nd_weight, dropout=t.nd_dropout)


def _student_prefix(objective: torch.nn.Module, student: torch.nn.Module) -> str:
    """Where the student sits in the objective's state dict ("student.", "inner.student." …)."""
    return next(name for name, module in objective.named_modules() if module is student) + "."


def _training_only_state(objective: torch.nn.Module, student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The objective's own modules (projector, embedding heads), without the student's weights."""
    prefix = _student_prefix(objective, student)
    return {k: v for k, v in objective.state_dict().items() if not k.startswith(prefix)}


def _fixed_class_means(cfg: PipelineConfig, scores: TeacherOutputs, run_dir: Path) -> Optional[torch.Tensor]:
    """ND class means shipped with the teacher (train.nd_class_means=teacher_checkpoint), else None."""
    if "nd" not in cfg.train.extra_losses or cfg.train.nd_class_means != "teacher_checkpoint":
        return None
    means = _checkpoint_class_means(cfg, run_dir)
    expected = (scores.logits.shape[1], scores.features.shape[1])
    if tuple(means.shape) != expected:
        raise Kd3Error(f"{cfg.score.teacher}: class_means has shape {tuple(means.shape)}, expected "
                       f"[{expected[0]}, {expected[1]}] (classes, teacher feature dim)")
    return means


def nd_class_means(scores: TeacherOutputs, rows: dict[str, int]) -> torch.Tensor:
    """c_k [K, D_T] over the samples trained this epoch: score-cache pooled teacher features grouped by
    the teacher's pseudo-label (argmax of the cached logits); a class without samples gets a zero row."""
    idx = torch.tensor(sorted(rows.values()), dtype=torch.long)
    return teacher_class_means(scores.features[idx], scores.logits[idx].argmax(1), scores.logits.shape[1])[0]


# ---------------------------------------------------------------------------------------- averaging
def _averages(cfg: PipelineConfig) -> Optional[TrainingAverages]:
    a = cfg.averaging
    if not a.modes:
        return None
    return TrainingAverages(a.modes, start_fraction=a.start_fraction, sma_start_step=a.sma_start_step, every=a.every,
                            swad_eval_every=a.swad_eval_every, swad_n_converge=a.swad_n_converge,
                            swad_n_tolerance=a.swad_n_tolerance, swad_tolerance_ratio=a.swad_tolerance_ratio)


def _validation_images(shards: list[Path], spec: InputSpec, val_rows: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out samples decoded once (uint8 [n, C, S, S] at the student's input, score rows [n]).

    Iterates the dataset directly, not through a DataLoader, so it draws nothing from torch's
    global RNG (a resumed run must see the same random stream as an uninterrupted one).
    """
    images: dict[int, torch.Tensor] = {}
    for item in ShardImages(shards, spec, uid_to_row=val_rows):
        images[item["row"]] = item["image"]
    if not images:
        raise Kd3Error("none of the held-out SWAD validation samples could be decoded; raise averaging.val_fraction")
    order = sorted(images)
    return torch.stack([images[r] for r in order]), torch.tensor(order, dtype=torch.long)


@torch.no_grad()
def validation_loss(student: torch.nn.Module, spec: InputSpec, images: torch.Tensor, teacher_logits: torch.Tensor,
                    kind: str, batch_size: int, device: torch.device) -> float:
    """SWAD's validation loss of the current weights on the held-out split (eval mode, then back).

    ``"kl"``: mean KL(p_T ‖ p_S) at τ = 1 against the cached teacher logits; ``"ce"``: cross-entropy
    with the teacher's pseudo-labels (argmax of the cached logits). Computed in float64 on CPU.
    """
    was_training = student.training
    student.eval()
    logits = torch.cat([student(normalize(images[i:i + batch_size].to(device), spec)).float().cpu()
                        for i in range(0, len(images), batch_size)])
    student.train(was_training)
    if kind == "kl":
        return predictive_kl(teacher_logits, logits, 1.0)
    return torch.nn.functional.cross_entropy(logits.double(), teacher_logits.argmax(1)).item()


# ---------------------------------------------------------------------------------------- selection
def _epoch_selection(cfg: PipelineConfig, epoch: int, teacher_logits: torch.Tensor,
                     student_logits: Optional[torch.Tensor],
                     held_out: Optional[torch.Tensor] = None) -> tuple[SelectionResult, float]:
    """The epoch's selection over the pool; held-out rows (SWAD validation) take no part in it:
    thresholds and counts come from the training rows only and held-out rows are never selected
    (their combined predictions are still reported in the manifest)."""
    if held_out is None or not bool(held_out.any()):
        return _pool_selection(cfg, epoch, teacher_logits, student_logits)
    train_idx = torch.nonzero(~held_out).flatten()
    sub, alpha = _pool_selection(cfg, epoch, teacher_logits[train_idx],
                                 None if student_logits is None else student_logits[train_idx])
    full, _ = _pool_selection(cfg, epoch, teacher_logits, student_logits)
    mask = torch.zeros(len(teacher_logits), dtype=torch.bool)
    mask[train_idx] = sub.mask
    return SelectionResult(mask=mask, labels=full.labels, confidences=full.confidences, thresholds=sub.thresholds,
                           counts=sub.counts, selected_per_class=sub.selected_per_class,
                           fallback_used=sub.fallback_used, dominant_class=sub.dominant_class), alpha


def _pool_selection(cfg: PipelineConfig, epoch: int, teacher_logits: torch.Tensor,
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
    train_rows, held_out = training_rows(cfg, scores)
    student, meta, objective, teacher = _build(cfg, run_dir, scores, device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, e))
    averages = _averages(cfg)
    start_epoch = global_step = 0
    last = out.path / "last.pt"
    if out.resumed and last.exists():
        payload = read_checkpoint(last)
        load_state_dict_strict(student, payload["state_dict"], str(last))
        trainer = payload["trainer"]
        extra = trainer.get("training_only", {})
        if extra:
            prefix = _student_prefix(objective, student)
            objective.load_state_dict({**{f"{prefix}{k}": v for k, v in payload["state_dict"].items()}, **extra})
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        _set_rng_state(trainer["rng"])
        if averages is not None:
            # back onto the training device, where the running averages are kept
            averages.load_state_dict(map_tensors(trainer["averaging"], lambda v: v.to(device)))
        start_epoch = trainer["epoch"] + 1
        global_step = int(trainer.get("global_step", 0))
        print(f"[{NAME}] resuming after epoch {start_epoch} from {last}")
    # drop records of an epoch that was interrupted after logging but before its checkpoint
    metrics_path = out.path / "metrics.jsonl"
    kept = [r for r in read_jsonl(metrics_path) if r.get("epoch", -1) < start_epoch]
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    shards = list_shards(run_dir / "download")
    teacher_logits = scores.logits
    names = meta.class_names
    held_out_t = torch.from_numpy(held_out)
    fixed_means = _fixed_class_means(cfg, scores, run_dir)
    static_rows = _static_rows(cfg, run_dir, train_rows) if t.method == "kd" else None
    if static_rows is not None and not static_rows:
        raise Kd3Error(f"no training samples: the selection in {run_dir / 'select'} is empty; "
                       "lower select.threshold or use train.data=all")
    val_images = val_rows = None
    if held_out.any():
        val_frame = scores.frame.loc[held_out, ["uid", "teacher_label", "teacher_conf"]]
        with atomic_path(out.path / VALIDATION) as tmp:
            val_frame.to_parquet(tmp, index=False)
        val_images, val_rows = _validation_images(shards, meta.input, {uid: pool_rows[uid] for uid in val_frame["uid"]})
    described = (f"plain KD (τ={t.temperature}) on cached teacher logits, {len(static_rows)} samples"
                 if t.method == "kd" else
                 f"KD³ over a pool of {len(train_rows)} (selection={cfg.kd3.selection}, "
                 f"shared classifier={'on' if cfg.kd3.shared_classifier else 'off'})")
    extras = f", extra losses {'+'.join(t.extra_losses)}" if t.extra_losses else ""
    averaged = f", averaging {'+'.join(averages.modes)}" if averages is not None else ""
    held = f", {len(val_rows)} samples held out for SWAD" if val_rows is not None else ""
    print(f"[{NAME}] {t.student.arch} student, {t.epochs} epochs, {described}{extras}{averaged}{held}")
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
            selection, alpha = _epoch_selection(cfg, epoch, teacher_logits, student_logits, held_out_t)
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
        if "nd" in t.extra_losses:
            objective.set_class_means(fixed_means if fixed_means is not None else nd_class_means(scores, rows))

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
        val_losses: list[float] = []
        n_batches = math.ceil(len(rows) / t.batch_size)
        loader = image_loader(dataset, t.batch_size, t.num_workers)
        for i, batch in enumerate(tqdm(loader, desc=f"[{NAME}] epoch {epoch + 1}/{t.epochs}", unit="batch",
                                       leave=False, disable=None, total=n_batches)):
            x = normalize(batch["image"].to(device), meta.input)
            x_t = normalize(batch["teacher_image"].to(device), teacher_view) if teacher_view is not None else x
            z_t = teacher_logits[batch["row"]].to(device)
            if "nd" in t.extra_losses:
                step = objective(x, x_t, z_t, generator, teacher_feature=scores.features[batch["row"]].to(device))
            else:
                step = objective(x, x_t, z_t, generator)
            optimizer.zero_grad(set_to_none=True)
            step.loss.backward()
            optimizer.step()
            if averages is not None:
                averages.after_step(student, global_step, epoch + min(i + 1, n_batches) / n_batches, t.epochs)
                if averages.swad_due(global_step):
                    val_losses.append(validation_loss(student, meta.input, val_images, teacher_logits[val_rows],
                                                      cfg.averaging.swad_val_loss, cfg.score.batch_size, device))
                    averages.close_swad_segment(val_losses[-1])
            global_step += 1
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
        record.update(lr=lr, samples=seen, step=global_step, seconds=round(time.monotonic() - started, 2))
        if averages is not None:
            record["averaged"] = averages.counts()
            if averages.swad is not None:
                record.update(swad_val_losses=val_losses, swad_start=averages.swad.start, swad_end=averages.swad.end)
        append_jsonl(metrics_path, record)
        trainer_state = {"epoch": epoch, "global_step": global_step, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                         "training_only": _training_only_state(objective, student),
                         "config": {"train": cfg.section("train"), "kd3": cfg.section("kd3"),
                                    "averaging": cfg.section("averaging")}, "seed": cfg.run.seed}
        if averages is not None:
            trainer_state["averaging"] = map_tensors(averages.state_dict(), lambda v: v.detach().cpu())
        epoch_path = out.path / f"epoch_{epoch:03d}.pt"
        save_checkpoint(epoch_path, student, meta, trainer=trainer_state)
        with atomic_path(last) as tmp:
            shutil.copyfile(epoch_path, tmp)
        parts = " ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss_"))
        extra = f" α {record['alpha']:.3f} selected {record['selected']}" if t.method == "kd3" else ""
        if val_losses:
            extra += f" swad val {cfg.averaging.swad_val_loss} {val_losses[-1]:.4f}"
        print(f"[{NAME}] epoch {epoch + 1}/{t.epochs}: loss {record['loss']:.4f} ({parts}){extra} "
              f"({record['seconds']:.1f}s)")
    final = read_jsonl(metrics_path)[-1]
    counts = {"method": t.method, "epochs": t.epochs, "final_loss": final["loss"],
              "final_selected": final.get("selected", len(static_rows or {})), "steps": final.get("step")}
    if averages is not None:
        counts["averaged"] = averages.counts()
        counts["validation_held_out"] = int(held_out.sum())
    return counts
