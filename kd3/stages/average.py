"""average: write the weight averages train kept (WAKD / SMA / SWAD) as student checkpoints.

Reads the trainer state of ``RUN/<train.output>/last.pt`` (the averages of section ``averaging``,
updated during training) and writes ``RUN/average/<mode>.pt`` per mode (``train-kd`` →
``average-kd/`` etc.): a normal student checkpoint with the student's metadata, so
``load_model`` / ``load_student`` and ``evaluate.students`` take it like any student, plus an
``averaged`` entry (mode, iterates, start step, SWAD window and validation curve). SWAD's model
merges the segment averages of the loss-valley window (METHODS.md §2). With
``average.bn_recompute`` each model's BatchNorm statistics are re-estimated with one pass over the
training data (the last epoch's selection for KD³, the training manifest for plain KD; held-out
validation samples excluded); off by default, as in the WAKD reference.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch
from torch import nn

from kd3 import layout
from kd3.config import PipelineConfig
from kd3.data.images import normalize
from kd3.data.pixel_cache import PoolPixels
from kd3.data.shards import ShardImages, check_shards_unchanged, image_loader, list_shards
from kd3.data.score_cache import require_score
from kd3.errors import Kd3Error
from kd3.methods.averaging_tracker import TrainingAverages
from kd3.models import InputSpec, ModelMeta, build_model, read_checkpoint, save_checkpoint
from kd3.models.checkpoints import load_state_dict_strict
from kd3.progress import Progress
from kd3.runs import StageDir, read_meta, stage_input_fingerprint
from kd3.runtime import configure

log = logging.getLogger(__name__)

NAME = "average"
SUMMARY = "write the WAKD / SMA / SWAD averages kept by train as student checkpoints (optional BN recompute)"
SECTIONS = ("average",)


def output_name(cfg: PipelineConfig) -> str:
    """``average`` for ``train.output=train``; ``average-kd`` for ``train-kd`` and so on."""
    return NAME + cfg.train.output[len("train"):]


def _source_meta(cfg: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    source = run_dir / cfg.train.output
    meta = read_meta(source)
    if meta is None or meta.get("status") != "complete":
        state = "missing" if meta is None else f"status {meta.get('status')!r}"
        raise Kd3Error(f"{NAME} needs a finished training run in {source} ({state}); run `kd3 train --run-dir "
                       f"{run_dir} train.output={cfg.train.output}` first")
    return meta


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    meta = _source_meta(cfg, run_dir)
    modes = meta.get("config", {}).get("averaging", {}).get("modes") or []
    if not modes:
        raise Kd3Error(f"{run_dir / cfg.train.output} was trained without weight averaging (averaging.modes is "
                       "empty); set averaging.modes (e.g. [wakd, sma]) and retrain with `kd3 train --overwrite`")
    inputs = {cfg.train.output: stage_input_fingerprint(run_dir, cfg.train.output)}
    if cfg.average.bn_recompute:
        require_score(run_dir, f"{NAME} (average.bn_recompute)")
        check_shards_unchanged(run_dir, f"{NAME} (average.bn_recompute)")  # BN statistics come from pool images
        inputs["score"] = stage_input_fingerprint(run_dir, layout.SCORE)
    return inputs


# -------------------------------------------------------------------------------------- BN recompute
def _training_uids(source: Path) -> list[str]:
    """The samples the last epoch trained on (its selection manifest; held-out SWAD validation
    samples are never selected)."""
    selection = layout.selection_dir(source)
    epochs = sorted(selection.glob("epoch_*.parquet"))
    if not epochs:
        raise Kd3Error(f"{selection}: no selection manifest to recompute BN statistics on")
    frame = pd.read_parquet(epochs[-1], columns=["uid", "selected"])
    return frame.loc[frame["selected"], "uid"].tolist()


@torch.no_grad()
def recompute_bn(model: nn.Module, spec: InputSpec, shards: list[Path], uid_to_row: dict[str, int],
                 batch_size: int, max_batches: Optional[int], device: torch.device,
                 pixels: Optional[PoolPixels] = None) -> int:
    """Re-estimate BatchNorm running statistics: reset them, then one pass in train mode with a
    cumulative average (momentum None, as ``torch.optim.swa_utils.update_bn``). Modules that stay
    in eval mode under ``model.train()`` (the frozen teacher head of a KD³ student) keep theirs.
    Returns the number of images seen; the model is left in eval mode."""
    model.train()
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    seen = 0
    if norms:
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        loader = image_loader(ShardImages(shards, spec, uid_to_row=uid_to_row, pixels=pixels), batch_size, 0)
        n_batches = math.ceil(len(uid_to_row) / batch_size)
        total = n_batches if max_batches is None else min(max_batches, n_batches)
        for b, batch in enumerate(Progress(loader, f"[{NAME}] BatchNorm statistics", unit="batch", total=total)):
            if max_batches is not None and b >= max_batches:
                break
            model(normalize(batch["image"].to(device), spec))
            seen += len(batch["image"])
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    model.eval()
    return seen


# ------------------------------------------------------------------------------------------- the run
def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    device = configure(cfg.run)
    run_dir = out.run_dir
    source = run_dir / cfg.train.output
    last = source / layout.LAST_CHECKPOINT
    payload = read_checkpoint(last)
    trainer = payload.get("trainer") or {}
    if trainer.get("averaging") is None:
        raise Kd3Error(f"{last}: no averaging state in the trainer state; retrain with averaging.modes set")
    averages = TrainingAverages.from_config(trainer["config"]["averaging"], modes=trainer["averaging"]["modes"])
    averages.load_state_dict(trainer["averaging"])
    finals = averages.final_states()
    missing = [m for m in averages.modes if m not in finals]
    if missing:
        raise Kd3Error(f"{last}: no iterate was averaged for {', '.join(missing)} in "
                       f"{trainer.get('global_step', '?')} steps (start too late?); lower averaging.start_fraction / "
                       "averaging.sma_start_step and retrain")
    meta = ModelMeta.from_dict(payload["model"])
    bn_rows = None
    shards: list[Path] = []
    pixels = None
    if cfg.average.bn_recompute:
        train_config = read_meta(source)["config"]["train"]
        uids = _training_uids(source)
        bn_rows = {uid: i for i, uid in enumerate(uids)}
        shards = list_shards(run_dir / layout.DOWNLOAD)
        pixels = PoolPixels.for_run(run_dir)
        batch_size = int(train_config.get("batch_size", 128))
    described: dict[str, Any] = {}
    for mode, (state, info) in finals.items():
        model = build_model(meta.arch, meta.num_classes, meta.input.channels, meta.options)
        load_state_dict_strict(model, state, f"{last} ({mode} average)")
        model.to(device)
        if bn_rows is not None:
            info["bn_recomputed_on"] = recompute_bn(model, meta.input, shards, bn_rows, batch_size,
                                                    cfg.average.bn_max_batches, device, pixels)
        path = out.path / f"{mode}.pt"
        save_checkpoint(path, model, meta, averaged={"mode": mode, "source": str(last), **info})
        described[mode] = info
        if mode == "swad" and info.get("fallback"):
            log.warning(f"[{NAME}] warning: SWAD found {info['fallback']} (validation losses: "
                        f"{', '.join(f'{v:.4f}' for v in info['val_losses']) or 'none'}); see averaging.swad_eval_every")
        window = (f", window segments {info['window'][0]}–{info['window'][1]} (steps {info['steps'][0]}–"
                  f"{info['steps'][1]})" if info.get("window") else "")
        log.info(f"[{NAME}] {mode}: average of {info['n_averaged']} iterates{window} -> {path}")
    return {"source": str(last), "steps": trainer.get("global_step"),
            "n_averaged": {m: i["n_averaged"] for m, i in described.items()},
            "swad_window": described.get("swad", {}).get("window"),
            "swad_steps": described.get("swad", {}).get("steps"),
            "swad_val_losses": described.get("swad", {}).get("val_losses"),
            "swad_fallback": described.get("swad", {}).get("fallback"),
            "bn_recompute": cfg.average.bn_recompute, "output": str(out.path)}
