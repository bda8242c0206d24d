"""Stages under torchrun on CPU (gloo, loopback only) against the one-process toy run, and
preemption of a training run by a signal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from kd3 import layout
from kd3.training.preemption import EXIT_CODE
from tests.conftest import DEMO_CONFIG, REPO

pytestmark = pytest.mark.slow
#: a threshold the untrained toy student's combined predictions pass, so that epoch 0 selects most of
#: the pool and each epoch has several steps to split (the toy default selects a single fallback row)
TRAIN = ["selectors.kd3_dynamic.threshold=0.1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # the subprocesses import this checkout's kd3; gloo talks over the loopback interface only
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def _command(stage: str, run_dir, overrides, *extra, nproc: int = 1) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "kd3.cli", stage, "--config", str(DEMO_CONFIG), "--run-dir",
            str(run_dir), *overrides, "run.num_threads=1", *extra]


def kd3(stage: str, run_dir, overrides, *extra, nproc: int = 1) -> subprocess.CompletedProcess:
    """``kd3 <stage>`` in a subprocess: one process, or ``nproc`` under torchrun (one thread each)."""
    return subprocess.run(_command(stage, run_dir, overrides, *extra, nproc=nproc), env=_env(), capture_output=True,
                          text=True, timeout=900)


def _copy(toy_run, dest, stages):
    for stage in stages:
        shutil.copytree(toy_run[0] / stage, dest / stage)


def test_two_process_score_writes_the_one_process_cache(toy_run, tmp_path):
    run_dir, overrides = toy_run
    _copy(toy_run, tmp_path, ["demo-data", "download"])
    done = kd3("score", tmp_path, overrides, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = run_dir / "score", tmp_path / "score"
    files = sorted(p.name for p in one.iterdir() if p.name not in ("meta.json", "stage.log"))
    assert files == sorted(p.name for p in two.iterdir() if p.name not in ("meta.json", "stage.log"))
    for name in files:  # teacher_outputs.parquet and the pixel / feature-map caches, byte for byte
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    meta = json.loads((two / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["counts"]["scored"] == json.loads(
        (one / "meta.json").read_text())["counts"]["scored"]
    assert (two / "stage.log").read_text().count("---- kd3 score") == 1  # rank 0 alone writes the log


def test_two_process_kd3_training_selects_like_one_process_and_ends_close_to_it(toy_run, tmp_path):
    """2 KD³ epochs on 2 ranks (each step's 32 rows split 16 + 16) against the one-process toy run.

    The epoch-0 selection comes from the initial student (the same seeded weights on every rank)
    over the gathered pool logits, so it is the one-process selection. The trained weights differ a
    little: each rank's BatchNorm normalises its 16 rows by their own statistics (one process: all
    32), MixDistribution's permutations and the contrastive negatives stay within a rank's rows, and
    the gradients are summed in another order. The tolerance is on the distance between the two
    final students (weights and BatchNorm buffers together) relative to how far training moved them
    from the shared initial weights: measured 0.084 (0.66 / 7.86) on this toy run, asserted < 0.25.
    That every rank holds the same student after every epoch is checked by the loop itself."""
    _, overrides = toy_run
    overrides = [*overrides, *TRAIN]
    for folder in ("one", "two"):
        _copy(toy_run, tmp_path / folder, ["demo-data", "download", "score"])
    for folder, nproc in (("one", 1), ("two", 2)):
        done = kd3("train", tmp_path / folder, overrides, nproc=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = tmp_path / "one" / "train", tmp_path / "two" / "train"
    a = pd.read_parquet(one / "selection" / "epoch_000.parquet")
    b = pd.read_parquet(two / "selection" / "epoch_000.parquet")
    # weight: each row's feature-alignment weight at its training step, which depends on the step's weights
    pd.testing.assert_frame_equal(a.drop(columns=["weight"]), b.drop(columns=["weight"]))
    assert (a["weight"].isna() == b["weight"].isna()).all()  # the same rows trained, each exactly once
    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    ones = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [m["samples"] for m in metrics] == [m["samples"] for m in ones]
    assert [m["step"] for m in metrics] == [m["step"] for m in ones]
    sa = torch.load(one / "last.pt", weights_only=True)["state_dict"]
    sb = torch.load(two / "last.pt", weights_only=True)["state_dict"]
    s0 = _initial_student(overrides, tmp_path / "one")
    assert sa.keys() == sb.keys()
    moved = sum(float((sa[k].double() - s0[k].double()).norm() ** 2) for k in sa if sa[k].is_floating_point())
    apart = sum(float((sa[k].double() - sb[k].double()).norm() ** 2) for k in sa if sa[k].is_floating_point())
    assert apart ** 0.5 < 0.25 * moved ** 0.5, (apart ** 0.5, moved ** 0.5)
    assert (two / "stage.log").read_text().count("---- kd3 train") == 1


def _initial_student(overrides, run_dir) -> dict[str, torch.Tensor]:
    """The student's weights before any step (both runs start from them), built as train builds them."""
    from kd3.config import load_config
    from kd3.runtime import configure
    from kd3.training.build import build_trainer

    cfg = load_config(str(DEMO_CONFIG), overrides)
    trainer, _ = build_trainer(cfg, run_dir, configure(cfg.run), None)
    return {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}


def test_a_signal_stops_training_with_the_preemption_code_and_resume_finishes(toy_run, tmp_path):
    _, overrides = toy_run
    _copy(toy_run, tmp_path, ["demo-data", "download", "score"])
    args = [sys.executable, "-m", "kd3.cli", "train", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path),
            *overrides, "run.num_threads=1", "train.objective=kd", "train.selector=teacher_confidence",
            "train.epochs=30", "-q"]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "train" / "epoch_000.pt"
    while not first.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_CODE, err[-2000:]
    assert "kd3: preempted: stopped by a signal" in err
    meta = json.loads((tmp_path / "train" / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["error"].startswith("Preempted")
    stopped_after = len((tmp_path / "train" / "metrics.jsonl").read_text().splitlines())
    assert 1 <= stopped_after < 30
    resumed = subprocess.run(args + ["--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(30))
    assert json.loads((tmp_path / "train" / "meta.json").read_text())["status"] == "complete"
    assert not (tmp_path / "train" / layout.MID_EPOCH_CHECKPOINT).exists()  # removed with its epoch's end


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "train" / "last.pt", weights_only=True)["state_dict"]


def test_a_signal_mid_epoch_under_torchrun_resumes_to_the_uninterrupted_weights(toy_run, tmp_path):
    _, overrides = toy_run
    full, cut = tmp_path / "full", tmp_path / "cut"
    for run_dir in (full, cut):
        _copy(toy_run, run_dir, ["demo-data", "download", "score"])
    # 15 steps an epoch; a periodic checkpoint after every step tells when training is under way
    args = [*TRAIN, "train.epochs=2", "train.batch_size=8", "train.checkpoint_every_steps=1", "-q"]
    done = kd3("train", full, overrides, *args, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(_command("train", cut, overrides, *args, nproc=2), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    mid = cut / "train" / layout.MID_EPOCH_CHECKPOINT
    while not mid.exists() and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm signals a job step: torchrun and both ranks
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0, err[-2000:]
    stopped = torch.load(mid, weights_only=True)["trainer"]
    assert stopped["mid_epoch"]["world_size"] == 2 and stopped["mid_epoch"]["batches_done"] >= 1
    assert json.loads((cut / "train" / "meta.json").read_text())["error"].startswith("Preempted")
    resumed = kd3("train", cut, overrides, *args, "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step" in (cut / "train" / "stage.log").read_text()
    a, b = _final_weights(full), _final_weights(cut)
    for key in a:
        assert torch.equal(a[key], b[key]), key
