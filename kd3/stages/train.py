"""train: distil the teacher into a student on the selected web samples.

Plain KD (``train.method=kd``) uses the score stage's cached teacher logits: the teacher is not
even loaded. Outputs in ``RUN/train/``: ``epoch_XXX.pt`` per epoch and ``last.pt`` (student
weights + metadata + trainer state: optimizer, scheduler, epoch, RNG, config), ``metrics.jsonl``
(one line per epoch). ``--resume`` continues after the last finished epoch with the same data order.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from kd3.config import PipelineConfig
from kd3.data.images import normalize
from kd3.data.shards import ShardImages, image_loader, list_shards
from kd3.errors import Kd3Error
from kd3.methods.kd import kd_loss
from kd3.models import ModelMeta, build_model, read_checkpoint, save_checkpoint
from kd3.models.checkpoints import load_state_dict_strict
from kd3.runs import StageDir, append_jsonl, atomic_write_text, read_jsonl, require_complete, stage_input_fingerprint
from kd3.runtime import configure
from kd3.stages.score import load_teacher_outputs
from kd3.stages.select import MANIFEST

NAME = "train"
SUMMARY = "train the student on the selected samples (checkpoint + metrics per epoch)"
SECTIONS = ("train",)


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    require_complete(run_dir, "score", NAME)
    inputs = {"score": stage_input_fingerprint(run_dir, "score")}
    if cfg.train.data == "selected":
        require_complete(run_dir, "select", NAME + " (train.data=selected; use train.data=all to skip selection)")
        inputs["select"] = stage_input_fingerprint(run_dir, "select")
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


def _training_rows(cfg: PipelineConfig, run_dir: Path, uid_to_row: dict[str, int]) -> dict[str, int]:
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


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    device = configure(cfg.run)
    t = cfg.train
    scores = load_teacher_outputs(out.run_dir)
    teacher_meta = scores.teacher
    rows = _training_rows(cfg, out.run_dir, scores.uid_to_row)
    if not rows:
        raise Kd3Error(f"no training samples: the selection in {out.run_dir / 'select'} is empty; "
                       "lower select.threshold or use train.data=all")
    meta = ModelMeta(arch=t.student.arch, options=t.student.options, num_classes=teacher_meta.num_classes,
                     class_names=teacher_meta.class_names, input=teacher_meta.input)
    model = build_model(meta.arch, meta.num_classes, meta.input.channels, meta.options).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, e))
    start_epoch = 0
    last = out.path / "last.pt"
    if out.resumed and last.exists():
        payload = read_checkpoint(last)
        load_state_dict_strict(model, payload["state_dict"], str(last))
        optimizer.load_state_dict(payload["trainer"]["optimizer"])
        scheduler.load_state_dict(payload["trainer"]["scheduler"])
        _set_rng_state(payload["trainer"]["rng"])
        start_epoch = payload["trainer"]["epoch"] + 1
        print(f"[{NAME}] resuming after epoch {start_epoch} from {last}")
    # drop metrics of an epoch that was interrupted after logging but before its checkpoint
    metrics_path = out.path / "metrics.jsonl"
    kept = [r for r in read_jsonl(metrics_path) if r.get("epoch", -1) < start_epoch]
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    teacher_logits = scores.logits
    dataset = ShardImages(list_shards(out.run_dir / "download"), meta.input, uid_to_row=rows,
                          shuffle=True, seed=cfg.run.seed)
    print(f"[{NAME}] {t.student.arch} student, {len(rows)} training samples, {t.epochs} epochs, "
          f"plain KD (τ={t.temperature}) on cached teacher logits")
    for epoch in range(start_epoch, t.epochs):
        dataset.set_epoch(epoch)
        model.train()
        started = time.monotonic()
        loss_sum, agree, seen = 0.0, 0, 0
        loader = image_loader(dataset, t.batch_size, t.num_workers)
        for batch in tqdm(loader, desc=f"[{NAME}] epoch {epoch + 1}/{t.epochs}", unit="batch", leave=False, disable=None,
                          total=math.ceil(len(rows) / t.batch_size)):
            x = normalize(batch["image"].to(device), meta.input)
            z_t = teacher_logits[batch["row"]].to(device)
            z_s = model(x)
            loss = kd_loss(z_s, z_t, t.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(x)
            loss_sum += loss.item() * n
            agree += (z_s.argmax(1) == z_t.argmax(1)).sum().item()
            seen += n
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record = {"epoch": epoch, "lr": lr, "loss": loss_sum / max(seen, 1), "train_agreement": agree / max(seen, 1),
                  "samples": seen, "seconds": round(time.monotonic() - started, 2)}
        append_jsonl(metrics_path, record)
        trainer = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "rng": _rng_state(), "config": cfg.section("train"), "seed": cfg.run.seed}
        epoch_path = out.path / f"epoch_{epoch:03d}.pt"
        save_checkpoint(epoch_path, model, meta, trainer=trainer)
        shutil.copyfile(epoch_path, out.path / ".last.pt.tmp")
        (out.path / ".last.pt.tmp").replace(last)
        print(f"[{NAME}] epoch {epoch + 1}/{t.epochs}: loss {record['loss']:.4f} "
              f"train agreement {record['train_agreement']:.3f} ({record['seconds']:.1f}s)")
    final = read_jsonl(metrics_path)[-1]
    return {"train_samples": len(rows), "epochs": t.epochs, "final_loss": final["loss"],
            "final_train_agreement": final["train_agreement"]}
