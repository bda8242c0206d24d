"""What happens around the training steps: weight averages (+ SWAD validation), selection
manifests, metrics, checkpoints. The loop calls the hooks in list order; a callback with state
saves it in the trainer state under its ``state_key`` so that resume is exact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd
import torch

from kd3 import layout
from kd3.data.images import normalize
from kd3.data.pixel_cache import PoolPixels
from kd3.data.manifest import selection_manifest
from kd3.data.shards import ShardImages
from kd3.errors import Kd3Error
from kd3.methods.averaging_tracker import TrainingAverages, map_tensors
from kd3.methods.fidelity import predictive_kl
from kd3.models import save_checkpoint
from kd3.models.spec import InputSpec, ModelMeta
from kd3.runs import append_jsonl, atomic_path, atomic_write_text, read_jsonl
from kd3.training.sources import EpochRows


@dataclass
class StepInfo:
    """One finished optimiser step, as callbacks see it."""

    epoch: int
    #: 0-based global step of this update
    global_step: int
    #: training progress in epochs after this step (epoch + fraction of its batches done)
    progress: float


class Callback:
    """No-op hooks; subclasses override what they need."""

    #: key of this callback's state in the trainer state (None: stateless)
    state_key: Optional[str] = None

    def on_fit_start(self, start_epoch: int) -> None:
        pass

    def after_step(self, step: StepInfo) -> None:
        pass

    def on_epoch_end(self, epoch: int, record: dict[str, Any], data: EpochRows,
                     trainer_state: Callable[[], dict[str, Any]]) -> None:
        pass

    def on_mid_epoch_checkpoint(self, trainer_state: dict[str, Any]) -> None:
        """A resumable state in the middle of an epoch (after an optimiser step; kd3.training.preemption)."""

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass


class WeightAveraging(Callback):
    """WAKD / SMA / SWAD averages of the student, updated after every step (METHODS.md §2).

    SWAD closes a segment every ``swad_eval_every`` steps with the validation loss of the current
    weights on the held-out split (decoded once). The averages stay on the training device and
    travel to the CPU only in the trainer state.
    """

    state_key = "averaging"

    def __init__(self, averages: TrainingAverages, student: torch.nn.Module, epochs: int,
                 validation: Optional["SwadValidation"], device: torch.device):
        self.averages, self.student, self.epochs = averages, student, epochs
        self.validation, self.device = validation, device
        self.val_losses: list[float] = []

    def after_step(self, step: StepInfo) -> None:
        self.averages.after_step(self.student, step.global_step, step.progress, self.epochs)
        if self.averages.swad_due(step.global_step):
            self.val_losses.append(self.validation.loss(self.student))
            self.averages.close_swad_segment(self.val_losses[-1])

    def on_epoch_end(self, epoch, record, data, trainer_state) -> None:
        record["averaged"] = self.averages.counts()
        if self.averages.swad is not None:
            record.update(swad_val_losses=self.val_losses, swad_start=self.averages.swad.start,
                          swad_end=self.averages.swad.end)
        self.val_losses = []

    def state_dict(self) -> Any:
        state = map_tensors(self.averages.state_dict(), lambda v: v.detach().cpu())
        # SWAD's validation losses of the epoch so far (empty at an epoch's end; a mid-epoch checkpoint's)
        state["epoch_val_losses"] = list(self.val_losses)
        return state

    def load_state_dict(self, state: Any) -> None:
        # back onto the training device, where the running averages are kept
        self.averages.load_state_dict(map_tensors(state, lambda v: v.to(self.device)))
        self.val_losses = [float(v) for v in state.get("epoch_val_losses", [])]


class SwadValidation:
    """SWAD's validation loss on the held-out split (decoded once, uint8, at the student's input).

    ``"kl"``: mean KL(p_T ‖ p_S) at τ = 1 against the cached teacher logits; ``"ce"``: cross-entropy
    with the teacher's pseudo-labels. Computed in eval mode (restored afterwards), float64 on CPU.
    """

    def __init__(self, shards: list[Path], spec: InputSpec, val_rows: dict[str, int], teacher_logits: torch.Tensor,
                 kind: str, batch_size: int, device: torch.device, pixels: Optional[PoolPixels] = None):
        images: dict[int, torch.Tensor] = {}
        # iterate the dataset directly, not through a DataLoader: that draws nothing from torch's
        # global RNG (a resumed run must see the same random stream as an uninterrupted one)
        for item in ShardImages(shards, spec, uid_to_row=val_rows, pixels=pixels):
            images[item["row"]] = item["image"]
        if not images:
            raise Kd3Error("none of the held-out SWAD validation samples could be decoded; "
                           "raise averaging.val_fraction")
        order = sorted(images)
        self.images = torch.stack([images[r] for r in order])
        self.teacher_logits = teacher_logits[torch.tensor(order, dtype=torch.long)]
        self.spec, self.kind, self.batch_size, self.device = spec, kind, batch_size, device

    @torch.no_grad()
    def loss(self, student: torch.nn.Module) -> float:
        was_training = student.training
        student.eval()
        logits = torch.cat([student(normalize(self.images[i:i + self.batch_size].to(self.device), self.spec))
                            .float().cpu() for i in range(0, len(self.images), self.batch_size)])
        student.train(was_training)
        if self.kind == "kl":
            return predictive_kl(self.teacher_logits, logits, 1.0)
        return torch.nn.functional.cross_entropy(logits.double(), self.teacher_logits.argmax(1)).item()


class SelectionManifests(Callback):
    """``selection/epoch_XXX.parquet``: one row per pool sample with its selection, predictions and
    last feature-alignment weight (NaN where not trained)."""

    def __init__(self, folder: Path, frame: pd.DataFrame):
        self.folder, self.frame = folder, frame
        folder.mkdir(parents=True, exist_ok=True)

    def on_epoch_end(self, epoch, record, data, trainer_state) -> None:
        frame = selection_manifest(self.frame, epoch, data.selection, data.selection.alpha, data.student_logits,
                                   data.weights)
        with atomic_path(self.folder / layout.epoch_manifest(epoch)) as tmp:
            frame.to_parquet(tmp, index=False)


class MetricsLog(Callback):
    """``metrics.jsonl``, one line per epoch; at start, records of epochs after the resume point
    (logged before an interruption but never checkpointed) are dropped."""

    def __init__(self, path: Path):
        self.path = path

    def on_fit_start(self, start_epoch: int) -> None:
        kept = [r for r in read_jsonl(self.path) if r.get("epoch", -1) < start_epoch]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def on_epoch_end(self, epoch, record, data, trainer_state) -> None:
        append_jsonl(self.path, record)


class Checkpoints(Callback):
    """``epoch_XXX.pt`` every epoch and ``last.pt`` (a copy): student weights + metadata + the trainer
    state; ``resume.pt`` (the same, with the epoch's progress) when a mid-epoch checkpoint is asked
    for, removed once ``last.pt`` is past it."""

    def __init__(self, folder: Path, student: torch.nn.Module, meta: ModelMeta):
        self.folder, self.student, self.meta = folder, student, meta

    def on_epoch_end(self, epoch, record, data, trainer_state) -> None:
        path = self.folder / layout.epoch_checkpoint(epoch)
        save_checkpoint(path, self.student, self.meta, trainer=trainer_state())
        with atomic_path(self.folder / layout.LAST_CHECKPOINT) as tmp:
            shutil.copyfile(path, tmp)
        (self.folder / layout.MID_EPOCH_CHECKPOINT).unlink(missing_ok=True)

    def on_mid_epoch_checkpoint(self, trainer_state) -> None:
        save_checkpoint(self.folder / layout.MID_EPOCH_CHECKPOINT, self.student, self.meta, trainer=trainer_state)
