"""Mid-epoch preemption: a SIGTERM after step N writes resume.pt and exits with 75; `--resume`
continues with step N+1 to the same weights, averages, metrics and manifests as an uninterrupted run
(bit for bit on the CPU). Also periodic mid-epoch checkpoints, and a toy run in bf16 on the CPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch

from kd3 import layout
from kd3.cli import main
from kd3.training.loop import Trainer
from kd3.training.preemption import EXIT_CODE
from tests.conftest import DEMO_CONFIG

pytestmark = pytest.mark.slow
#: 15 optimiser steps per epoch over most of the toy pool (the toy threshold selects one row), the
#: KD³ objective with SWAD validating every 2 steps: a stop lands inside the averages' segments
TRAIN = ["train.epochs=2", "train.batch_size=8", "selectors.kd3_dynamic.threshold=0.1", "-q"]


def _upstream(toy_run, dest):
    run_dir, overrides = toy_run
    for stage in ("demo-data", "download", "score"):
        shutil.copytree(run_dir / stage, dest / stage)
    return overrides


def _train(dest, overrides, *extra) -> int:
    return main(["train", "--config", str(DEMO_CONFIG), "--run-dir", str(dest), *overrides, *TRAIN, *extra])


def _after_step(monkeypatch, n: int, action) -> None:
    """Call ``action()`` right after the ``n``-th optimiser step of this process."""
    original = Trainer._optimizer_step
    done = {"steps": 0}

    def counting(self):
        original(self)
        done["steps"] += 1
        if done["steps"] == n:
            action()

    monkeypatch.setattr(Trainer, "_optimizer_step", counting)


def _assert_identical(a, b, where: str) -> None:
    """Nested checkpoint values equal exactly (tensors bit for bit)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _same_run(full, cut) -> None:
    a = torch.load(full / "train" / "last.pt", weights_only=True)
    b = torch.load(cut / "train" / "last.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    ta, tb = a["trainer"], b["trainer"]
    for key in ("global_step", "averaging", "optimizer", "scheduler", "grad_scaler", "training_only"):
        _assert_identical(ta[key], tb[key], key)

    def records(run):
        lines = (run / "train" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert records(full) == records(cut)
    for e in range(2):
        name = layout.epoch_manifest(e)
        pd.testing.assert_frame_equal(pd.read_parquet(full / "train" / "selection" / name),
                                      pd.read_parquet(cut / "train" / "selection" / name))
    assert not (cut / "train" / layout.MID_EPOCH_CHECKPOINT).exists()
    assert json.loads((cut / "train" / "meta.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("stop_after, precision", [(20, "fp32"), (15, "fp32"), (6, "fp16")],
                         ids=["epoch-2-step-5", "last-step-of-epoch-1", "epoch-1-fp16-grad-scaler"])
def test_sigterm_mid_epoch_then_resume_gives_the_uninterrupted_run(toy_run, tmp_path, monkeypatch, stop_after,
                                                                   precision):
    full, cut = tmp_path / "full", tmp_path / "cut"
    overrides = _upstream(toy_run, full)
    _upstream(toy_run, cut)
    extra = [f"run.precision={precision}"]
    assert _train(full, overrides, *extra) == 0
    with monkeypatch.context() as patch:
        # a real SIGTERM, caught by the stage's handler while step `stop_after` finishes
        _after_step(patch, stop_after, lambda: os.kill(os.getpid(), signal.SIGTERM))
        assert _train(cut, overrides, *extra) == EXIT_CODE
    mid = torch.load(cut / "train" / layout.MID_EPOCH_CHECKPOINT, weights_only=True)["trainer"]
    epoch, done = divmod(stop_after - 1, 15)
    assert (mid["mid_epoch"]["epoch"], mid["mid_epoch"]["batches_done"], mid["global_step"]) == \
        (epoch, done + 1, stop_after)
    assert mid["epoch"] == epoch - 1  # the last finished epoch
    assert (cut / "train" / layout.LAST_CHECKPOINT).exists() == (epoch > 0)
    meta = json.loads((cut / "train" / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["error"].startswith("Preempted")
    if precision == "fp16":
        assert mid["grad_scaler"]["scale"] > 0
    assert _train(cut, overrides, *extra, "--resume") == 0
    _same_run(full, cut)


def test_periodic_checkpoints_resume_a_run_that_died_without_a_signal(toy_run, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    overrides = _upstream(toy_run, full)
    _upstream(toy_run, cut)
    assert _train(full, overrides) == 0

    def die():
        raise KeyboardInterrupt  # the process ends between checkpoints, nothing written on the way out

    with monkeypatch.context() as patch:
        _after_step(patch, 22, die)
        assert _train(cut, overrides, "train.checkpoint_every_steps=4") == 130
    mid = torch.load(cut / "train" / layout.MID_EPOCH_CHECKPOINT, weights_only=True)["trainer"]
    assert (mid["global_step"], mid["mid_epoch"]["batches_done"]) == (20, 5)
    assert _train(cut, overrides, "train.checkpoint_every_steps=4", "--resume") == 0
    _same_run(full, cut)


def test_a_stale_mid_epoch_checkpoint_behind_last_pt_is_not_resumed(toy_run, tmp_path):
    from kd3.stages.train import resume_checkpoint

    overrides = _upstream(toy_run, tmp_path)
    assert _train(tmp_path, overrides, "train.epochs=1") == 0
    folder = tmp_path / "train"
    assert resume_checkpoint(folder)[0] == folder / layout.LAST_CHECKPOINT
    payload = torch.load(folder / layout.LAST_CHECKPOINT, weights_only=True)
    # as if the epoch had finished just before resume.pt (written during it) could be removed
    payload["trainer"]["mid_epoch"] = {"epoch": 0}
    torch.save(payload, folder / layout.MID_EPOCH_CHECKPOINT)
    assert resume_checkpoint(folder)[0] == folder / layout.LAST_CHECKPOINT
    payload["trainer"]["mid_epoch"] = {"epoch": 1}
    torch.save(payload, folder / layout.MID_EPOCH_CHECKPOINT)
    assert resume_checkpoint(folder)[0] == folder / layout.MID_EPOCH_CHECKPOINT


def test_bf16_score_train_and_evaluate_on_the_cpu(toy_run, tmp_path):
    run_dir, overrides = toy_run
    for stage in ("demo-data", "download"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    bf16 = ["run.precision=bf16", "run.channels_last=true", "-q"]
    for stage in ("score", "train", "evaluate"):
        extra = {"train": TRAIN, "evaluate": ['evaluate.students={kd3: "{run}/train/last.pt"}']}.get(stage, [])
        assert main([stage, "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides, *extra,
                     *bf16]) == 0, stage
    fp32 = pd.read_parquet(run_dir / "score" / "teacher_outputs.parquet")
    low = pd.read_parquet(tmp_path / "score" / "teacher_outputs.parquet")
    assert list(fp32["uid"]) == list(low["uid"])
    a, b = (torch.from_numpy(np.stack(frame["logits"])) for frame in (fp32, low))
    assert torch.isfinite(b).all() and not torch.equal(a, b)  # bf16 forwards, not a float32 rerun
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.9
    records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    report = json.loads((tmp_path / "evaluate" / "report.json").read_text())
    assert all(math.isfinite(r["top1"]) for r in report["rows"])
