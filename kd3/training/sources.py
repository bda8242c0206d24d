"""Where each epoch's training rows come from: a selector over the scored pool, run every epoch.

A static selector (one that ignores the student) gives the same rows every epoch; a dynamic one
(KD³'s rule) sees the current student's logits on the un-augmented pool, computed here with one
student pass per epoch (under torchrun each rank passes over its share of the shards and the logits
are gathered, so every rank runs the selector on the same full-pool logits and selects the same rows). The teacher is never run: its logits come from the score cache.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from kd3.compute import Compute
from kd3.data.score_cache import TeacherOutputs
from kd3.data.shards import LoaderOptions
from kd3.errors import Kd3Error
from kd3.inference import pool_logits
from kd3.methods.selection import SelectionResult
from kd3.methods.selectors import SELECTORS, SelectionInputs, Selector, run_selector
from kd3.models.spec import InputSpec
from kd3.params import Params

log = logging.getLogger(__name__)


@dataclass
class EpochRows:
    """One epoch's training data: score-cache rows and the selection they came from."""

    #: uid → score-cache row of every sample trained this epoch
    rows: dict[str, int]
    selection: SelectionResult
    #: the student's pool logits [N, K] the selection used (None when the selector needs none)
    student_logits: Optional[torch.Tensor]
    #: each pool row's feature-alignment weight at its last step this epoch [N] (NaN where not
    #: trained, or for objectives without weights); filled in by the loop
    weights: Optional[torch.Tensor] = None

    def selection_state(self) -> dict[str, Any]:
        """The selection as plain values and tensors (a mid-epoch checkpoint's; see :meth:`SelectedPool.restore`)."""
        return {"selection": dataclasses.asdict(self.selection), "student_logits": self.student_logits}


class SelectedPool:
    """Rows re-selected every epoch by ``selector`` among the ``eligible`` pool rows."""

    def __init__(self, selector: Selector, params: Params, scores: TeacherOutputs, shards: list[Path],
                 eligible: Optional[torch.Tensor], seed: int, batch_size: int, workers: Union[int, LoaderOptions],
                 device: torch.device, compute: Optional[Compute] = None):
        self.selector, self.params = selector, params
        self.scores = scores
        self.uid_to_row = scores.uid_to_row
        self.shards = shards
        self.eligible = eligible
        self.seed = seed
        self.batch_size, self.workers, self.device = batch_size, workers, device
        self.compute = compute
        if selector.needs_bn and scores.bn_score is None:
            if getattr(params, "fallback", "error") != "all":
                raise Kd3Error(f"train.selector {selector.name} needs the teacher's BatchNorm in-domain score, and "
                               "the score cache has none (the teacher has no BatchNorm2d layer); use "
                               f"selectors.{selector.name}.fallback=all, or teacher_confidence, dfnd_topk, random, all")
            log.info(f"[train] note: the teacher has no BatchNorm2d layer, so {selector.name} has no in-domain score: "
                     f"training on every sample instead (selectors.{selector.name}.fallback=all)")
            self.selector, self.params = SELECTORS.get("all"), SELECTORS.get("all").params()

    @property
    def needs_student(self) -> bool:
        return self.selector.needs_student(self.params)

    def epoch(self, epoch: int, total_epochs: int, student: torch.nn.Module, student_input: InputSpec) -> EpochRows:
        student_logits = None
        if self.needs_student:
            student_logits = pool_logits(student, student_input, self.scores.teacher.num_classes, self.shards,
                                         self.uid_to_row, self.batch_size, self.workers, self.device,
                                         self.scores.pixels, f"[train] epoch {epoch + 1}/{total_epochs}: student over the pool",
                                         split_by_rank=True, compute=self.compute)
        inputs = SelectionInputs(teacher_logits=self.scores.logits, student_logits=student_logits, epoch=epoch,
                                 total_epochs=total_epochs, seed=self.seed, bn_score=self.scores.bn_score,
                                 bn_per_layer=self.scores.bn_per_layer)
        try:
            selection = run_selector(self.selector, self.params, inputs, self.eligible)
        except ValueError as exc:  # parameters that do not fit this pool or teacher
            raise Kd3Error(f"train.selector {self.selector.name}: {exc}") from None
        return self._rows(selection, student_logits)

    def restore(self, state: dict[str, Any]) -> EpochRows:
        """An epoch's rows from :meth:`EpochRows.selection_state` (resuming mid-epoch: the selection was
        made from the student at the epoch's start, which is gone by then)."""
        return self._rows(SelectionResult(**state["selection"]), state["student_logits"])

    def _rows(self, selection: SelectionResult, student_logits: Optional[torch.Tensor]) -> EpochRows:
        chosen = set(torch.nonzero(selection.mask).flatten().tolist())
        rows = {uid: r for uid, r in self.uid_to_row.items() if r in chosen}
        return EpochRows(rows=rows, selection=selection, student_logits=student_logits)
