"""The training loop: epochs of (select rows → train on them), knowing nothing of the method.

Per epoch: the source picks the rows (a selector over the pool), the objective's ``begin_epoch``
hook runs, the rows are streamed from the shards in a seeded shuffled order and each batch is
one optimiser step (gradients accumulated over ``accumulate`` batches). Callbacks do the rest
(averages, manifests, metrics, checkpoints). ``Trainer.restore`` continues from a checkpoint's
trainer state with the same data order, selections and averages as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from kd3.data.images import normalize
from kd3.data.score_cache import TeacherOutputs
from kd3.data.shards import ShardImages, image_loader
from kd3.errors import Kd3Error
from kd3.methods.objectives import Objective, StepOutput
from kd3.models.checkpoints import load_state_dict_strict
from kd3.models.spec import InputSpec, ModelMeta
from kd3.progress import Progress, format_duration
from kd3.training.callbacks import Callback, StepInfo
from kd3.training.sources import EpochRows, SelectedPool
from kd3.training.state import load_training_only_state, rng_state, set_rng_state, training_only_state

log = logging.getLogger(__name__)


class DegenerateSelection(Kd3Error):
    """An epoch's selection collapsed below the run's floor."""


@dataclass
class Trainer:
    """Everything one training run needs; :meth:`fit` runs the remaining epochs."""

    objective: Objective
    #: the module saved as the student (inside the objective)
    student: torch.nn.Module
    meta: ModelMeta
    #: the teacher's preprocessing when the objective runs the teacher on its own view
    teacher_view: Optional[InputSpec]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    source: SelectedPool
    scores: TeacherOutputs
    shards: list[Path]
    epochs: int
    batch_size: int
    num_workers: int
    seed: int
    device: torch.device
    callbacks: list[Callback] = field(default_factory=list)
    #: plain values saved with every checkpoint's trainer state (e.g. the config)
    state_extras: dict[str, Any] = field(default_factory=dict)
    #: optimiser step every this many batches (gradients summed, loss scaled by 1/accumulate)
    accumulate: int = 1
    #: an epoch selecting fewer rows than this, or falling back because nothing passed the rule,
    #: raises :class:`DegenerateSelection` (0: never)
    min_selected: int = 0
    name: str = "train"
    start_epoch: int = 0
    global_step: int = 0

    # ------------------------------------------------------------------------------------ state
    def trainer_state(self) -> dict[str, Any]:
        state = {"epoch": self.start_epoch - 1, "global_step": self.global_step,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state(), "training_only": training_only_state(self.objective, self.student),
                 **self.state_extras}
        for cb in self.callbacks:
            if cb.state_key is not None:
                state[cb.state_key] = cb.state_dict()
        return state

    def restore(self, payload: dict[str, Any], source: str) -> None:
        """Continue after the epoch a checkpoint (``payload``, read with weights_only) finished."""
        load_state_dict_strict(self.student, payload["state_dict"], source)
        trainer = payload["trainer"]
        load_training_only_state(self.objective, self.student, payload["state_dict"],
                                 trainer.get("training_only", {}))
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        set_rng_state(trainer["rng"])
        for cb in self.callbacks:
            if cb.state_key is not None and trainer.get(cb.state_key) is not None:
                cb.load_state_dict(trainer[cb.state_key])
        self.start_epoch = trainer["epoch"] + 1
        self.global_step = int(trainer.get("global_step", 0))

    # ------------------------------------------------------------------------------------- loop
    def fit(self) -> Optional[dict[str, Any]]:
        """Train the remaining epochs; returns the last epoch's metrics record (None if none ran)."""
        record = None
        for cb in self.callbacks:
            cb.on_fit_start(self.start_epoch)
        started, first = time.monotonic(), self.start_epoch
        for epoch in range(self.start_epoch, self.epochs):
            record = self._epoch(epoch)
            left = self.epochs - epoch - 1
            eta = f", ETA {format_duration((time.monotonic() - started) / (epoch + 1 - first) * left)}" if left else ""
            log.info(self._epoch_line(record) + eta)
        return record

    def _epoch(self, epoch: int) -> dict[str, Any]:
        started = time.monotonic()
        data = self.source.epoch(epoch, self.epochs, self.student, self.meta.input)
        record = {"epoch": epoch, **self._selection_record(epoch, data)}
        self.objective.begin_epoch(epoch, torch.tensor(sorted(data.rows.values()), dtype=torch.long))
        self.student.train()
        self.objective.train()
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        data.weights = torch.full((len(self.scores.frame),), float("nan"))
        sums: dict[str, float] = {}
        extras: dict[str, float] = {}
        seen = 0
        n_batches = math.ceil(len(data.rows) / self.batch_size)
        progress = Progress(self.loader(data.rows, epoch), f"[{self.name}] epoch {epoch + 1}/{self.epochs}",
                            unit="batch", total=n_batches)
        for i, batch in enumerate(progress):
            last_of_group = (i + 1) % self.accumulate == 0 or i + 1 == n_batches
            step, x, z_t = self.train_step(batch, generator, zero_grad=i % self.accumulate == 0, update=last_of_group)
            if last_of_group:
                for cb in self.callbacks:
                    cb.after_step(StepInfo(epoch, self.global_step, epoch + min(i + 1, n_batches) / n_batches))
                self.global_step += 1
            n = len(x)
            seen += n
            for name, value in {"loss": step.loss.item(), **{f"loss_{k}": v for k, v in step.terms.items()}}.items():
                sums[name] = sums.get(name, 0.0) + value * n
            if step.weights is not None:
                data.weights[batch["row"]] = step.weights.detach().float().cpu()
            if step.student_logits is not None:  # this step's own forward: the student before its update
                agree = (step.student_logits.detach().argmax(1) == z_t.argmax(1)).sum().item()
                extras["train_agreement"] = extras.get("train_agreement", 0.0) + agree
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        record.update({name: total / max(seen, 1) for name, total in sums.items()})
        trained = ~torch.isnan(data.weights)
        if trained.any():
            record["mean_weight"] = float(data.weights[trained].mean())
        record.update({name: total / max(seen, 1) for name, total in extras.items()})
        record.update(lr=lr, samples=seen, step=self.global_step, seconds=round(time.monotonic() - started, 2))
        self.start_epoch = epoch + 1  # the trainer state now describes the end of this epoch
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, record, data, self.trainer_state)
        return record

    def _epoch_line(self, record: dict[str, Any]) -> str:
        parts = " ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss_"))
        extra = f" α {record['alpha']:.3f} selected {record['selected']}"
        if record.get("swad_val_losses"):
            extra += f" swad val {record['swad_val_losses'][-1]:.4f}"
        return (f"[{self.name}] epoch {record['epoch'] + 1}/{self.epochs}: loss {record['loss']:.4f} ({parts}){extra} "
                f"({record['seconds']:.1f}s)")

    def loader(self, rows: dict[str, int], epoch: int) -> torch.utils.data.DataLoader:
        """The epoch's batches: the given rows decoded from the shards in a seeded shuffled order."""
        dataset = ShardImages(self.shards, self.meta.input, uid_to_row=rows, shuffle=True, seed=self.seed,
                              epoch=epoch, teacher_spec=self.teacher_view, pixels=self.scores.pixels)
        return image_loader(dataset, self.batch_size, self.num_workers)

    def train_step(self, batch: dict[str, Any], generator: torch.Generator, zero_grad: bool = True,
                   update: bool = True) -> tuple[StepOutput, torch.Tensor, torch.Tensor]:
        """One batch: forward through the objective, backward, and (``update``) the optimiser step.
        Returns the step's output, the normalised student input and the cached teacher logits."""
        x = normalize(batch["image"].to(self.device), self.meta.input)
        x_t = normalize(batch["teacher_image"].to(self.device), self.teacher_view) if self.teacher_view else x
        z_t = self.scores.logits[batch["row"]].to(self.device)
        f_t = self.scores.features[batch["row"]].to(self.device)
        maps = {}
        if self.scores.feature_maps is not None and self.objective.uses_teacher_feature_map:
            maps["teacher_feature_map"] = self.scores.feature_map_rows(batch["row"]).to(self.device)
        step = self.objective(x, x_t, z_t, generator, teacher_feature=f_t, **maps)
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        (step.loss / self.accumulate if self.accumulate > 1 else step.loss).backward()
        if update:
            self.optimizer.step()
        return step, x, z_t

    def _selection_record(self, epoch: int, data: EpochRows) -> dict[str, Any]:
        """Per-epoch selection diagnostics (logged, and warned about when they signal trouble);
        a collapsed selection stops the run (see ``min_selected``)."""
        s, names = data.selection, self.meta.class_names
        if self.min_selected and (s.fallback_used or len(data.rows) < self.min_selected):
            cause = "nothing passed the selection rule" if s.fallback_used else "the selection collapsed"
            raise DegenerateSelection(
                f"epoch {epoch + 1}: {cause}: {len(data.rows)} sample(s) selected, below the floor of "
                f"{self.min_selected} (train.min_selected_fraction of the pool); loosen the selector's "
                "parameters (e.g. selectors.kd3_dynamic.threshold), choose another train.selector, or set "
                "train.min_selected_fraction=0 to train on it anyway")
        if s.fallback_used:
            log.warning(f"[{self.name}] warning: epoch {epoch + 1}: nothing passed the thresholds; "
                        f"trained on the {len(data.rows)} most confident sample(s)")
        if s.dominant_class is not None:
            share = s.counts[s.dominant_class].item() / max(int(s.counts.sum()), 1)
            log.warning(f"[{self.name}] warning: epoch {epoch + 1}: class {names[s.dominant_class]!r} holds "
                        f"{share:.0%} of the confident samples; other classes' thresholds fall towards 0 "
                        "(see selectors.kd3_dynamic.threshold_floor / max_class_share)")
        return {"alpha": s.alpha, "selected": len(data.rows),
                "selected_per_class": {names[c]: int(n) for c, n in enumerate(s.selected_per_class)},
                "confident_per_class": {names[c]: int(n) for c, n in enumerate(s.counts)},
                "class_thresholds": [round(float(v), 6) for v in s.thresholds],
                "fallback_used": bool(s.fallback_used),
                "dominant_class": None if s.dominant_class is None else names[s.dominant_class]}
