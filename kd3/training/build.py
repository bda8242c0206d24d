"""Build a :class:`~kd3.training.loop.Trainer` from the config and a run folder's finished stages.

The one place where registries, data, callbacks and optimiser meet: the train stage calls it with
its output folder, benchmarks call it without one (no files written) to time the real step.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kd3 import layout
from kd3.compute import Compute
from kd3.config import PipelineConfig
from kd3.data import subsets
from kd3.data.exclusions import excluded_mask
from kd3.data.score_cache import TeacherOutputs, load_teacher_outputs
from kd3.data.shards import list_shards
from kd3.errors import Kd3Error
from kd3.methods.averaging_tracker import TrainingAverages
from kd3.methods.selectors import SELECTORS
from kd3.models import build_model
from kd3.models.spec import InputSpec
from kd3.runs import atomic_path
from kd3.training.callbacks import Checkpoints, MetricsLog, SelectionManifests, SwadValidation, WeightAveraging
from kd3.training.loop import Trainer
from kd3.training.objectives import OBJECTIVES, BuildContext, build_objective
from kd3.training.sources import SelectedPool
from kd3.training.state import lr_factor

log = logging.getLogger(__name__)


def config_sections(cfg: PipelineConfig) -> tuple[str, ...]:
    """The config sections a training run depends on: train, the objective's own, selectors, averaging."""
    own = OBJECTIVES.get(cfg.train.objective).section
    return ("train",) + ((own,) if own else ()) + ("selectors", "averaging")


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


def held_out_mask(cfg: PipelineConfig, scores: TeacherOutputs) -> np.ndarray:
    """SWAD's validation split over score-cache rows (bool [N]; all False without SWAD): the
    max(1, round(val_fraction·N)) rows with the smallest SHA-256("kd3-val:" + uid)."""
    uids = list(scores.frame["uid"])
    if "swad" not in cfg.averaging.modes:
        return np.zeros(len(uids), dtype=bool)
    n_val = max(1, round(cfg.averaging.val_fraction * len(uids)))
    if n_val >= len(uids):
        raise Kd3Error(f"averaging.val_fraction={cfg.averaging.val_fraction} leaves no training sample in a pool "
                       f"of {len(uids)}; lower it or drop swad from averaging.modes")
    return subsets.uid_hash_mask(uids, n_val, subsets.SWAD_VALIDATION)


def build_trainer(cfg: PipelineConfig, run_dir: Path, device: torch.device, out_dir: Optional[Path],
                  name: str = "train") -> tuple[Trainer, np.ndarray]:
    """(trainer, SWAD held-out mask [N]). With ``out_dir`` the trainer writes checkpoints, metrics,
    selection manifests (and SWAD's ``validation.parquet``) there; without it, nothing."""
    t = cfg.train
    scores = load_teacher_outputs(run_dir)
    held_out = held_out_mask(cfg, scores)
    spec = student_input_spec(cfg, scores.teacher.input)
    # build order fixes the initial weights (global RNG): student network, then the objective's parts
    backbone = build_model(t.student.arch, scores.teacher.num_classes, spec.channels, t.student.options,
                           image_size=spec.image_size)
    compute = Compute.from_config(cfg.run, device)
    built = build_objective(BuildContext(cfg, run_dir, scores, device, backbone, spec, compute))
    # the objective holds the student: both on the device (channels_last where that is on)
    objective = compute.model(built.objective)
    student = compute.model(built.student)
    optimizer = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=t.lr,
                                momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(t.scheduler, e, t.epochs, t.step_milestones))
    shards = list_shards(run_dir / layout.DOWNLOAD)
    excluded = excluded_mask(cfg, "train.exclude", run_dir, list(scores.frame["uid"]))
    eligible = ~held_out & ~excluded
    if excluded.any():
        log.info(f"[{name}] leaving out {int(excluded.sum())} of {len(excluded)} pool samples listed in train.exclude")
        if not eligible.any():
            raise Kd3Error(f"{cfg.source}: train.exclude lists every trainable pool sample; nothing is left to train on")
    source = SelectedPool(SELECTORS.get(t.selector), cfg.selector_params(t.selector), scores, shards,
                          None if eligible.all() else torch.from_numpy(eligible), cfg.run.seed,
                          cfg.score.batch_size, compute.section_loader(t), device, compute)
    callbacks = []
    if cfg.averaging.modes:
        validation = None
        if held_out.any():
            val_frame = scores.frame.loc[held_out, ["uid", "teacher_label", "teacher_conf"]]
            if out_dir is not None:
                with atomic_path(out_dir / layout.VALIDATION) as tmp:
                    val_frame.to_parquet(tmp, index=False)
            val_rows = {uid: int(r) for uid, r in zip(val_frame["uid"], np.flatnonzero(held_out))}
            validation = SwadValidation(shards, built.meta.input, val_rows, scores.logits,
                                        cfg.averaging.swad_val_loss, cfg.score.batch_size, device, scores.pixels)
        averages = TrainingAverages.from_config(cfg.section("averaging"))
        callbacks.append(WeightAveraging(averages, student, t.epochs, validation, device))
    if out_dir is not None:
        callbacks += [SelectionManifests(layout.selection_dir(out_dir), scores.frame),
                      MetricsLog(out_dir / layout.METRICS), Checkpoints(out_dir, student, built.meta)]
    config = {section: cfg.section(section) for section in config_sections(cfg)}
    trainer = Trainer(objective=objective, student=student, meta=built.meta, teacher_view=built.teacher_view,
                      optimizer=optimizer, scheduler=scheduler, source=source, scores=scores, shards=shards,
                      epochs=t.epochs, batch_size=t.batch_size, workers=compute.section_loader(t), seed=cfg.run.seed,
                      device=device, compute=compute, checkpoint_every_steps=t.checkpoint_every_steps, callbacks=callbacks, state_extras={"config": config, "seed": cfg.run.seed},
                      name=name, min_selected=math.ceil(t.min_selected_fraction * int(eligible.sum())))
    return trainer, held_out
