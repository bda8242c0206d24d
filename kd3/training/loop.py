"""The training loop: epochs of (select rows → train on them), knowing nothing of the method.

Per epoch: the source picks the rows (a selector over the pool), the objective's ``begin_epoch``
hook runs, the rows are streamed from the shards in a seeded shuffled order and each batch is
one optimiser step (gradients accumulated over ``accumulate`` batches). Callbacks do the rest
(averages, manifests, metrics, checkpoints). ``Trainer.restore`` continues from a checkpoint's
trainer state with the same data order, selections and averages as an uninterrupted run: after
the epoch it finished, or (a mid-epoch checkpoint, :mod:`kd3.training.preemption`) after the
optimiser step it was written at.

Forwards run under the run's autocast precision (:class:`kd3.compute.Compute`; the losses
themselves in float32, :mod:`kd3.methods.precision`) and ``backward`` outside it; fp16 scales
the loss with a ``GradScaler`` whose state travels in the checkpoints.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from kd3 import dist, layout
from kd3.compute import Compute
from kd3.data.score_cache import TeacherOutputs
from kd3.data.shards import LoaderOptions, ShardImages, image_loader
from kd3.errors import Kd3Error
from kd3.methods.objectives import Objective, StepOutput
from kd3.models.checkpoints import load_state_dict_strict
from kd3.models.spec import InputSpec, ModelMeta
from kd3.progress import Progress, format_duration
from kd3.training.callbacks import Callback, StepInfo
from kd3.training.preemption import Preempted, StopRequest
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
    #: the DataLoader options of the epoch's batches and the pool pass
    workers: LoaderOptions
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
    #: precision, memory format and host→device copies (default: float32 on the CPU)
    compute: Compute = field(default_factory=Compute)
    #: write a mid-epoch checkpoint every this many optimiser steps (0: only on a stop signal)
    checkpoint_every_steps: int = 0
    #: set by a SIGTERM / SIGUSR1 handler (:mod:`kd3.training.preemption`); checked after every step
    stop: Optional[StopRequest] = None
    _stop_seen: bool = False
    _group_samples: int = 0
    #: the interrupted epoch's progress, from a mid-epoch checkpoint (:meth:`restore`)
    _mid_epoch: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        #: fp16 only (loss scaling against gradient underflow); None otherwise
        self.scaler = self.compute.grad_scaler()

    # ------------------------------------------------------------------------------------ state
    def trainer_state(self) -> dict[str, Any]:
        state = {"epoch": self.start_epoch - 1, "global_step": self.global_step,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state(), "training_only": training_only_state(self.objective, self.student),
                 "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 **self.state_extras}
        for cb in self.callbacks:
            if cb.state_key is not None:
                state[cb.state_key] = cb.state_dict()
        return state

    def restore(self, payload: dict[str, Any], source: str) -> None:
        """Continue after the epoch a checkpoint (``payload``, read with weights_only) finished, or
        after the step a mid-epoch checkpoint was written at."""
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
        if self.scaler is not None and trainer.get("grad_scaler"):
            self.scaler.load_state_dict(trainer["grad_scaler"])
        self.start_epoch = trainer["epoch"] + 1
        self.global_step = int(trainer.get("global_step", 0))
        self._mid_epoch = trainer.get("mid_epoch")
        if self._mid_epoch is not None and self._mid_epoch["world_size"] != dist.size():
            raise Kd3Error(f"{source} was written by {self._mid_epoch['world_size']} process(es) in the middle of epoch "
                           f"{self.start_epoch + 1}, and this run has {dist.size()}: resume with "
                           f"{self._mid_epoch['world_size']} (the epoch's rows are split by process), or delete it "
                           f"to redo epoch {self.start_epoch + 1} from last.pt")

    # ------------------------------------------------------------------------------------- loop
    def fit(self) -> Optional[dict[str, Any]]:
        """Train the remaining epochs; returns the last epoch's metrics record (None if none ran)."""
        record = None
        if self.batch_size % dist.size():
            raise Kd3Error(f"train.batch_size={self.batch_size} does not split over {dist.size()} processes; "
                           f"use a multiple of {dist.size()} (each step's batch is shared out among the ranks)")
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
        mid, self._mid_epoch = self._mid_epoch, None
        if mid is None:
            self._check_stop(epoch, "before its selection")
            data = self.source.epoch(epoch, self.epochs, self.student, self.meta.input)
        else:  # resuming mid-epoch: the selection made at the epoch's start
            data = self.source.restore(mid)
        record = {"epoch": epoch, **self._selection_record(epoch, data)}
        self.objective.begin_epoch(epoch, torch.tensor(sorted(data.rows.values()), dtype=torch.long))
        self.student.train()
        self.objective.train()
        # each rank its own augmentation stream (rank 0's is the one-process stream)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 1_000_003 * dist.rank())
        progress = _EpochProgress(data, generator, len(self.scores.frame))
        # the optimiser steps of the epoch, the same on every rank: under torchrun each step's batch
        # of train.batch_size rows is split over the ranks
        n_batches = math.ceil(len(data.rows) / self.batch_size)
        batches = self._batches(data.rows, epoch, n_batches)
        if mid is not None:
            progress.resume(mid, batches)
        for i, batch in enumerate(batches, start=progress.batches_done):
            last_of_group = (i + 1) % self.accumulate == 0 or i + 1 == n_batches
            step, x, z_t = self.train_step(batch, generator, zero_grad=i % self.accumulate == 0, update=last_of_group)
            if step is not None:  # None: this rank had no rows left for this step (under torchrun)
                progress.add(step, batch, z_t)
            progress.batches_done = i + 1
            if last_of_group:
                for cb in self.callbacks:
                    cb.after_step(StepInfo(epoch, self.global_step, epoch + min(i + 1, n_batches) / n_batches))
                self.global_step += 1
                self._after_update(epoch, n_batches, progress)
        sums, extras, seen = progress.sums, progress.extras, progress.seen
        if dist.is_distributed():
            sums, extras, seen = _merge_epoch_sums(sums, extras, seen)
            data.weights = dist.merge_rows(data.weights)
        lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():
            # resumed after the epoch's last step, this process has no optimiser step before the
            # schedule's (restored) epoch step: torch's ordering warning does not apply
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        record.update({name: total / max(seen, 1) for name, total in sums.items()})
        trained = ~torch.isnan(data.weights)
        if trained.any():
            record["mean_weight"] = float(data.weights[trained].mean())
        record.update({name: total / max(seen, 1) for name, total in extras.items()})
        record.update(lr=lr, samples=seen, step=self.global_step, seconds=round(time.monotonic() - started, 2))
        if dist.is_distributed():
            _check_ranks_agree(self.objective, epoch)
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

    def loader(self, rows: dict[str, int], epoch: int, batch_size: Optional[int] = None) -> torch.utils.data.DataLoader:
        """The epoch's batches: the given rows decoded from the shards in a seeded shuffled order."""
        dataset = ShardImages(self.shards, self.meta.input, uid_to_row=rows, shuffle=True, seed=self.seed,
                              epoch=epoch, teacher_spec=self.teacher_view, pixels=self.scores.pixels)
        return image_loader(dataset, batch_size or self.batch_size, self.workers)

    def _batches(self, rows: dict[str, int], epoch: int, n_batches: int) -> Iterator[Optional[dict[str, Any]]]:
        """The epoch's batches on this rank. One process: the loader's batches as they come. Under
        torchrun: this rank's share of the rows (:func:`rank_rows`) in batches of
        batch_size / world size, exactly ``n_batches`` items on every rank (None once this rank's
        rows are used up), so every rank enters every step's all-reduce."""
        desc = f"[{self.name}] epoch {epoch + 1}/{self.epochs}"
        if not dist.is_distributed():
            yield from Progress(self.loader(rows, epoch), desc, unit="batch", total=n_batches)
            return
        mine = rank_rows(rows, self.seed, epoch, dist.rank(), dist.size())
        batches = iter(Progress(self.loader(mine, epoch, self.batch_size // dist.size()), desc, unit="batch",
                                total=n_batches))
        for _ in range(n_batches):
            yield next(batches, None)
        if next(batches, None) is not None:
            raise Kd3Error(f"rank {dist.rank()}: more batches than the {n_batches} steps of epoch {epoch + 1}")

    def _stop_requested(self) -> bool:
        """A stop signal came (on any rank under torchrun: the flag was all-reduced with the step)."""
        return self._stop_seen or (self.stop is not None and self.stop.requested and not dist.is_distributed())

    def _check_stop(self, epoch: int, where: str) -> None:
        """At an epoch's start: raise :class:`Preempted` once a stop signal came (``last.pt`` of the
        previous epoch is then the resume point)."""
        if self._stop_requested():
            done = f"from last.pt (after epoch {self.start_epoch})" if self.start_epoch else "from the start"
            raise Preempted(f"stopped by a signal during epoch {epoch + 1} ({where}); `kd3 train --resume` "
                            f"redoes epoch {epoch + 1} {done}")

    def _after_update(self, epoch: int, n_batches: int, progress: "_EpochProgress") -> None:
        """After an optimiser step: the mid-epoch checkpoint when one is due (a stop signal, or every
        ``checkpoint_every_steps``), then :class:`Preempted` on a stop. Every rank decides alike (the
        stop flag and the step count are the same on all), so all enter the checkpoint's collectives."""
        stop = self._stop_requested()
        periodic = (self.checkpoint_every_steps > 0 and self.global_step % self.checkpoint_every_steps == 0
                    and progress.batches_done < n_batches)  # at the epoch's end last.pt follows at once
        if stop or periodic:
            state = self.trainer_state()
            state["mid_epoch"] = progress.state_dict(epoch)
            for cb in self.callbacks:
                cb.on_mid_epoch_checkpoint(state)
            dist.barrier()  # rank 0's file is complete before any rank exits (torchrun then stops the rest)
        if stop:
            raise Preempted(f"stopped by a signal in epoch {epoch + 1} after step {progress.batches_done} of "
                            f"{n_batches}, at a mid-epoch checkpoint ({layout.MID_EPOCH_CHECKPOINT}); "
                            f"`kd3 train --resume` continues with step {progress.batches_done + 1}")

    def train_step(self, batch: Optional[dict[str, Any]], generator: torch.Generator, zero_grad: bool = True,
                   update: bool = True) -> tuple[Optional[StepOutput], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """One batch: forward through the objective, backward, and (``update``) the optimiser step.
        Returns the step's output, the normalised student input and the cached teacher logits.
        Under torchrun the gradients are all-reduced before the update; a rank without a batch
        (``batch`` None) only takes part in that (and returns Nones)."""
        if zero_grad:
            self._group_samples = 0
        if batch is None:
            if zero_grad:
                self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(torch.zeros((), device=self.device))  # sets up the scale on a rank without rows
            if update:
                self._synchronise()
                self._optimizer_step()
            return None, None, None
        c = self.compute
        x = c.images(batch["image"], self.meta.input)
        x_t = c.images(batch["teacher_image"], self.teacher_view) if self.teacher_view else x
        z_t = c.to_device(self.scores.logits[batch["row"]])
        f_t = c.to_device(self.scores.features[batch["row"]])
        maps = {}
        if self.scores.feature_maps is not None and self.objective.uses_teacher_feature_map:
            maps["teacher_feature_map"] = c.to_device(self.scores.feature_map_rows(batch["row"]))
        with c.autocast():  # the forwards (student, teacher); the losses inside run in float32
            step = self.objective(x, x_t, z_t, generator, teacher_feature=f_t, **maps)
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        loss = step.loss / self.accumulate if self.accumulate > 1 else step.loss
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self._group_samples += len(x)
        if update:
            self._synchronise()
            self._optimizer_step()
        return step, x, z_t

    def _optimizer_step(self) -> None:
        """The update; with fp16's scaler: unscaled, skipped when a gradient overflowed (the same on
        every rank: the gradients were all-reduced first), and the scale adapted."""
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _synchronise(self) -> None:
        """Under torchrun: make every rank's gradients the sample-weighted mean of all ranks' (the
        global batch's mean gradient), average the objective's buffers (BatchNorm statistics) over
        the ranks that had samples, and share the stop flag; one process: nothing."""
        if not dist.is_distributed():
            return
        stop = self.stop is not None and self.stop.requested
        self._stop_seen = all_reduce_step(list(self.objective.parameters()), list(self.objective.buffers()),
                                          self._group_samples, stop)

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


def rank_rows(rows: dict[str, int], seed: int, epoch: int, rank: int, world: int) -> dict[str, int]:
    """This rank's share of an epoch's rows: the rows in score-cache order, shuffled from (seed,
    epoch) and dealt out one per rank in turn, so shares differ by at most one row, no row is on two
    ranks, and a row changes rank between epochs (BatchNorm batches mix the whole selection)."""
    order = sorted(rows.items(), key=lambda item: item[1])
    random.Random(f"{seed}-{epoch}-ranks").shuffle(order)
    return dict(order[rank::world])


class _EpochProgress:
    """One epoch's running totals on this rank (metric sums, samples, feature-alignment weights, the
    batches done) and, for a mid-epoch checkpoint, everything that resumes it exactly."""

    def __init__(self, data: EpochRows, generator: torch.Generator, pool_size: int):
        self.data, self.generator = data, generator
        data.weights = torch.full((pool_size,), float("nan"))
        self.sums: dict[str, float] = {}
        self.extras: dict[str, float] = {}
        self.seen = 0
        self.batches_done = 0

    def add(self, step: StepOutput, batch: dict[str, Any], z_t: torch.Tensor) -> None:
        n = len(batch["row"])
        self.seen += n
        for name, value in {"loss": step.loss.item(), **{f"loss_{k}": v for k, v in step.terms.items()}}.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * n
        if step.weights is not None:
            self.data.weights[batch["row"]] = step.weights.detach().float().cpu()
        if step.student_logits is not None:  # this step's own forward: the student before its update
            agree = (step.student_logits.detach().argmax(1) == z_t.argmax(1)).sum().item()
            self.extras["train_agreement"] = self.extras.get("train_agreement", 0.0) + agree

    def state_dict(self, epoch: int) -> dict[str, Any]:
        """The epoch so far (every rank calls it): totals over the ranks, each rank's RNG streams."""
        sums, extras, seen, weights = self.sums, self.extras, self.seen, self.data.weights
        if dist.is_distributed():
            sums, extras, seen = _merge_epoch_sums(sums, extras, seen)
            weights = dist.merge_rows(weights)
        return {"epoch": epoch, "batches_done": self.batches_done, "world_size": dist.size(),
                **self.data.selection_state(), "sums": sums, "extras": extras, "seen": seen, "weights": weights,
                "generators": dist.all_gather_object(self.generator.get_state()),
                "rngs": dist.all_gather_object(rng_state())}

    def resume(self, state: dict[str, Any], batches: Iterator[Any]) -> None:
        """Continue from :meth:`state_dict`: the done batches are drawn from ``batches`` and dropped
        (the same order as before the interruption; they are not trained again), then this rank's
        augmentation and global RNG streams are put back where they were after the last step (the
        loader drew from the global stream when it started)."""
        if dist.is_main():  # the totals are over all ranks: one rank carries them into the epoch's merge
            self.sums, self.extras, self.seen = dict(state["sums"]), dict(state["extras"]), int(state["seen"])
            self.data.weights = state["weights"].clone()
        for _ in range(state["batches_done"]):
            next(batches)
        self.batches_done = state["batches_done"]
        self.generator.set_state(state["generators"][dist.rank()])
        set_rng_state(state["rngs"][dist.rank()])


def all_reduce_step(params: list[torch.nn.Parameter], buffers: list[torch.Tensor], samples: int,
                    stop: bool) -> bool:
    """One step's synchronisation of a rank that trained on ``samples`` rows (0: none this step).

    Gradients become Σ_r n_r·g_r / Σ_r n_r (g_r: rank r's mean gradient over its n_r rows), which is
    the gradient of the mean loss over the global batch; a parameter no rank has a gradient for keeps
    none (the optimiser then skips it, as in one process). Floating buffers become their mean over the
    ranks with samples (the others did not update them); integer buffers (BatchNorm's step count) are
    equal on those ranks and copied. Returns whether any rank asked to stop. Two all-reduces: the
    gradients (float32) and the buffers (float64, so integer counts stay exact)."""
    trainable = [p for p in params if p.requires_grad]
    grads = [(p.grad.detach().float() * samples if p.grad is not None else torch.zeros(p.shape, device=p.device))
             .reshape(-1) for p in trainable]
    device = trainable[0].device if trainable else torch.device("cpu")
    flags = torch.tensor([float(p.grad is not None) for p in trainable] + [float(samples), float(stop)], device=device)
    reduced = dist.all_reduce(torch.cat(grads + [flags]))
    total, stopped = reduced[-2].item(), reduced[-1].item() > 0
    has_grad = reduced[-2 - len(trainable):-2]
    offset = 0
    for p, has in zip(trainable, has_grad.tolist()):
        chunk = reduced[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
        p.grad = (chunk / total).to(p.dtype) if has > 0 and total > 0 else None
    if buffers:
        weight = 1.0 if samples > 0 else 0.0
        packed = torch.cat([b.detach().double().reshape(-1) * weight for b in buffers]
                           + [torch.tensor([weight], dtype=torch.float64, device=buffers[0].device)])
        packed = dist.all_reduce(packed)
        ranks_with_samples = packed[-1].item()
        if ranks_with_samples > 0:
            offset = 0
            for b in buffers:
                value = packed[offset:offset + b.numel()].view(b.shape) / ranks_with_samples
                offset += b.numel()
                b.copy_(value.round() if not b.is_floating_point() else value)
    return stopped


def _merge_epoch_sums(sums: dict[str, float], extras: dict[str, float], seen: int
                      ) -> tuple[dict[str, float], dict[str, float], int]:
    """Every rank's per-epoch metric sums added up (a rank that trained nothing has no keys)."""
    total_sums: dict[str, float] = {}
    total_extras: dict[str, float] = {}
    total_seen = 0
    for rank_sums, rank_extras, rank_seen in dist.all_gather_object((sums, extras, seen)):
        for name, value in rank_sums.items():
            total_sums[name] = total_sums.get(name, 0.0) + value
        for name, value in rank_extras.items():
            total_extras[name] = total_extras.get(name, 0.0) + value
        total_seen += rank_seen
    return total_sums, total_extras, total_seen


def _check_ranks_agree(objective: torch.nn.Module, epoch: int) -> None:
    """Every rank must hold the same weights and buffers after an epoch (the next selection, the
    averages and rank 0's checkpoint rely on it): one checksum per rank, compared exactly."""
    with torch.no_grad():
        checksum = [float(t.double().sum()) for t in [*objective.parameters(), *objective.buffers()]]
    sums = dist.all_gather_object(checksum)
    if any(other != sums[0] for other in sums[1:]):
        raise Kd3Error(f"epoch {epoch + 1}: the ranks' students differ after the epoch's all-reduced steps; "
                       "this is a kd3 bug (please report it with the stage log)")
