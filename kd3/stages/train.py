"""train: distil the teacher into a student on web samples.

The objective (``train.objective``, a registry entry: ``kd`` = KL(p_T‖p_S) on the score stage's
cached teacher logits, the teacher is not even loaded; ``kd3`` = KD³, METHODS.md §1b–1d) is
trained on the rows a selector (``train.selector``, parameters ``selectors.<name>``) chooses from
the scored pool every epoch: ``teacher_confidence``, ``all``, ``random``, ``kd3_dynamic`` (KD³'s
combined teacher+student predictions, for which the student runs over the whole pool each epoch;
the teacher's logits always come from the score cache) and any selector registered by the user.
Any objective can add the ND loss (``train.extra_losses: [nd]``, METHODS.md §4) and keep weight
averages of the student (section ``averaging``: WAKD, SMA, SWAD; METHODS.md §2). SWAD holds out
``averaging.val_fraction`` of the pool (by uid hash; never selected, listed in
``validation.parquet``) and evaluates the student on it every ``averaging.swad_eval_every`` steps.

Outputs in ``RUN/train/``: ``epoch_XXX.pt`` per epoch and ``last.pt`` (student weights + metadata
+ trainer state: optimizer, scheduler, epoch, global step, RNG, training-only modules, averages,
config), ``metrics.jsonl`` (one line per epoch) and ``selection/epoch_XXX.parquet`` (one row per
pool sample with its selection). ``--resume`` continues after the last finished epoch with the
same data order, selections and averages as an uninterrupted run. SIGTERM or SIGUSR1 stops the run
after the optimiser step in progress, writes ``resume.pt`` (a mid-epoch checkpoint; also every
``train.checkpoint_every_steps``) and exits with status 75 (:mod:`kd3.training.preemption`);
``--resume`` continues with the next step, to the same final weights. Under torchrun the ranks share each step's batch (gradients
all-reduced) and rank 0 writes everything.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from kd3 import dist, layout
from kd3.config import PipelineConfig, resolve_path
from kd3.data.exclusions import exclude_inputs
from kd3.data.score_cache import require_score
from kd3.data.shards import check_shards_unchanged
from kd3.errors import Kd3Error
from kd3.models import read_checkpoint
from kd3.runs import StageDir, file_fingerprint, read_jsonl, stage_input_fingerprint
from kd3.runtime import configure
from kd3.training.build import build_trainer, config_sections
from kd3.training.objectives import check_objective
from kd3.training.preemption import stop_on_signals

log = logging.getLogger(__name__)

NAME = "train"
#: runs on every rank under torchrun (kd3.stages.base)
DISTRIBUTED = True
SUMMARY = "train the student (objective kd or kd3, rows chosen by a selector every epoch); checkpoint + metrics per epoch"


#: the teacher (score.teacher) and the pool pass's batch size (score.batch_size)
READS = ("score",)


def sections(cfg: PipelineConfig) -> tuple[str, ...]:
    return config_sections(cfg)


def output_name(cfg: PipelineConfig) -> str:
    """``RUN/<train.output>/``: "train" unless a variant run names its own folder."""
    return cfg.train.output


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    score_meta = require_score(run_dir, NAME)
    check_shards_unchanged(run_dir, NAME)
    _check_cached_teacher(cfg, run_dir, score_meta)
    check_objective(cfg, run_dir)
    from kd3.models import MODELS

    MODELS.get(cfg.train.student.arch)  # fail before any work on an unknown architecture
    return {"score": stage_input_fingerprint(run_dir, layout.SCORE), **exclude_inputs(cfg, "train.exclude", run_dir)}


def _check_cached_teacher(cfg: PipelineConfig, run_dir: Path, score_meta: dict[str, Any]) -> None:
    """score.teacher must still be the checkpoint whose logits the score stage cached: the cache and
    (for KD³) the loaded teacher would otherwise be two different teachers."""
    teacher = resolve_path(cfg.score.teacher, run_dir)
    cached = score_meta.get("inputs", {}).get("teacher")
    if cached and teacher.is_file() and file_fingerprint(teacher) != cached:
        raise Kd3Error(f"score.teacher {teacher} is not the teacher whose outputs {run_dir / layout.SCORE} cached "
                       f"(checkpoint fingerprint {file_fingerprint(teacher)}, cached {cached}); point score.teacher "
                       "back at that checkpoint, or redo the score stage with `kd3 score --overwrite`")


def resume_checkpoint(folder: Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """Where an interrupted run continues: ``resume.pt`` (mid-epoch) when it is ahead of ``last.pt``
    (the last finished epoch), else ``last.pt``; None when neither exists. (A resume.pt behind
    last.pt is one whose epoch finished before it could be removed.)"""
    last, mid = folder / layout.LAST_CHECKPOINT, folder / layout.MID_EPOCH_CHECKPOINT
    finished = read_checkpoint(last) if last.exists() else None
    if mid.exists():
        payload = read_checkpoint(mid)
        if finished is None or payload["trainer"]["mid_epoch"]["epoch"] > finished["trainer"]["epoch"]:
            return mid, payload
    return (last, finished) if finished is not None else None


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    device = configure(cfg.run)
    t = cfg.train
    # under torchrun every rank trains (the same selection, its share of each batch); rank 0 alone
    # writes checkpoints, manifests and metrics
    trainer, held_out = build_trainer(cfg, out.run_dir, device, out.path if dist.is_main() else None, name=NAME)
    resume_from = resume_checkpoint(out.path) if out.resumed else None
    if resume_from is not None:
        path, payload = resume_from
        trainer.restore(payload, str(path))
        mid = payload["trainer"].get("mid_epoch")
        where = f"after step {mid['batches_done']} of epoch {mid['epoch'] + 1}" if mid else f"after epoch {trainer.start_epoch}"
        log.info(f"[{NAME}] resuming {where} from {path}")
    extras = f", extra losses {'+'.join(t.extra_losses)}" if t.extra_losses else ""
    averaged = f", averaging {'+'.join(cfg.averaging.modes)}" if cfg.averaging.modes else ""
    held = f", {int(held_out.sum())} samples held out for SWAD" if held_out.any() else ""
    log.info(f"[{NAME}] {t.student.arch} student, {t.epochs} epochs, objective {t.objective}, selector {t.selector} "
             f"over a pool of {int((~held_out).sum())}{extras}{averaged}{held}")
    with stop_on_signals() as trainer.stop:
        trainer.fit()
    if not dist.is_main():
        return {}
    final = read_jsonl(out.path / layout.METRICS)[-1]
    counts = {"objective": t.objective, "selector": t.selector, "epochs": t.epochs, "final_loss": final["loss"],
              "final_selected": final.get("selected"), "steps": final.get("step")}
    if cfg.averaging.modes:
        counts["averaged"] = final.get("averaged")
        counts["validation_held_out"] = int(held_out.sum())
    return counts
