"""End to end at toy scale: every stage runs, writes what README promises, and obeys the folder policy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from kd3.cli import main
from kd3.models import load_model
from tests.conftest import DEMO_CONFIG

pytestmark = pytest.mark.slow


def meta(run_dir, stage):
    return json.loads((run_dir / stage / "meta.json").read_text())


def test_every_stage_completes_with_counts(toy_run):
    run_dir, _ = toy_run
    for stage in ("demo-data", "download", "score", "select", "train", "train-kd", "average", "evaluate"):
        m = meta(run_dir, stage)
        assert m["status"] == "complete", stage
        assert m["config_fingerprint"] and m["versions"]["torch"]
    download = meta(run_dir, "download")["counts"]
    # 90 MNIST + 30 crops + 4 broken entries (404, empty, HTML named .jpg, truncated PNG)
    assert download["urls"] == 124
    assert download["failed"] == 4 and download["ok"] == 120
    assert sum(download["failures_by_reason"].values()) == 4


def test_download_writes_shards_and_parquet_keyed_by_uid(toy_run):
    run_dir, _ = toy_run
    shards = run_dir / "download" / "shards"
    assert sorted(p.name for p in shards.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list(shards.glob("meta.json"))  # img2dataset's resume parses every json there
    index = pd.concat(pd.read_parquet(p) for p in shards.glob("*.parquet"))
    assert index["uid"].is_unique and set(index["status"]) == {"success", "failed_to_download"} | (
        set(index["status"]) - {"success", "failed_to_download"})
    failed = index[index["status"] != "success"]
    assert failed["url"].str.contains("broken/").all() and failed["error_message"].notna().all()


def test_score_cache_and_selection_manifest(toy_run):
    run_dir, _ = toy_run
    scores = pd.read_parquet(run_dir / "score" / "teacher_outputs.parquet")
    assert len(scores) == 120 and scores["uid"].is_unique
    assert len(scores["logits"].iloc[0]) == 10
    assert scores["url"].str.contains("{port}", regex=False).all()  # stable, port-free URLs
    # the demo teacher has 6 BatchNorm layers: a BN in-domain score per sample, overall and per layer
    per_layer = np.stack(scores["bn_per_layer"].to_numpy())
    assert per_layer.shape == (120, 6) and np.isfinite(per_layer).all() and (per_layer >= 0).all()
    np.testing.assert_allclose(scores["bn_score"], per_layer.mean(1), rtol=1e-5)
    score_meta = json.loads((run_dir / "score" / "meta.json").read_text())
    assert len(score_meta["counts"]["bn_layers"]) == 6
    manifest = pd.read_parquet(run_dir / "select" / "manifest.parquet")
    assert {"uid", "url", "teacher_label", "teacher_conf", "selected"} <= set(manifest.columns)
    assert manifest.loc[manifest["selected"], "teacher_conf"].min() >= 0.3
    assert manifest.loc[~manifest["selected"], "teacher_conf"].max() < 0.3


@pytest.mark.parametrize("folder", ["train", "train-kd"])
def test_train_writes_checkpoints_metrics_and_loadable_student(toy_run, folder):
    run_dir, _ = toy_run
    train = run_dir / folder
    assert (train / "epoch_000.pt").exists() and (train / "epoch_001.pt").exists() and (train / "last.pt").exists()
    lines = (train / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    payload = torch.load(train / "last.pt", weights_only=True)
    assert payload["trainer"]["epoch"] == 1 and "optimizer" in payload["trainer"]
    model, model_meta, _ = load_model(train / "last.pt")
    size = model_meta.input.image_size
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 10)


def test_each_stage_logs_into_its_folder_with_progress_of_its_loops(toy_run):
    run_dir, _ = toy_run
    expected = {"download": ["[download] img2dataset: 124/124 URLs (100%)"],
                "score": ["[score] teacher: 120/120 samples (100%)"],
                "train": ["[train] epoch 2/2: student over the pool: ", "[train] epoch 2/2: 1/"],
                "train-kd": ["[train] epoch 1/2: 1/"],
                "evaluate": ["[evaluate] images through 5 model(s): "]}
    for stage, lines in expected.items():
        text = (run_dir / stage / "stage.log").read_text()
        assert text.startswith("20") and f"---- kd3 {stage.split('-')[0]}" in text, stage
        for line in lines:
            assert f"INFO kd3.progress: {line}" in text, (stage, line)
    assert "ETA " in (run_dir / "score" / "stage.log").read_text()
    assert "[train] epoch 1/2: loss" in (run_dir / "train" / "stage.log").read_text()


def test_evaluate_report_has_teacher_and_student_rows(toy_run):
    run_dir, _ = toy_run
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    rows = {(r["dataset"], r["model"]): r for r in report["rows"]}
    models = ("teacher", "kd3", "kd3-wakd", "kd3-sma", "kd")
    assert set(rows) == {(d, m) for d in ("private_test", "mnist_shifted") for m in models}
    for name in ("kd3", "kd"):
        student = rows[("private_test", name)]
        assert 0.0 <= student["agreement"] <= 1.0 and student["kl"] >= 0.0
        assert student["delta_top1"] == pytest.approx(student["top1"] - rows[("private_test", "teacher")]["top1"])
    assert "| private_test | kd3 |" in (run_dir / "evaluate" / "report.md").read_text()


def test_rerun_refuses_then_resume_reuses(toy_run, capsys):
    run_dir, overrides = toy_run
    args = ["select", "--config", str(DEMO_CONFIG), "--run-dir", str(run_dir), *overrides]
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main([*args, "--resume", "selectors.teacher_confidence.threshold=0.5"]) == 2
    assert "selectors.teacher_confidence.threshold" in capsys.readouterr().err


def test_train_resume_continues_after_last_epoch(toy_run, tmp_path):
    """Kill after epoch 1 of 2 (simulated by a 1-epoch run marked unfinished), then --resume."""
    import shutil

    run_dir, overrides = toy_run
    for stage in ("demo-data", "download", "score", "select"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    args = ["train", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides, "train.objective=kd",
            "train.selector=teacher_confidence"]
    assert main(args) == 0
    full = torch.load(tmp_path / "train" / "last.pt", weights_only=True)["state_dict"]
    # rewind: keep epoch 0's checkpoint as last.pt and mark the stage unfinished
    shutil.copyfile(tmp_path / "train" / "epoch_000.pt", tmp_path / "train" / "last.pt")
    (tmp_path / "train" / "epoch_001.pt").unlink()
    m = meta(tmp_path, "train")
    m["status"] = "running"
    (tmp_path / "train" / "meta.json").write_text(json.dumps(m))
    assert main([*args, "--resume"]) == 0
    resumed = torch.load(tmp_path / "train" / "last.pt", weights_only=True)["state_dict"]
    for key in full:
        assert torch.allclose(full[key].float(), resumed[key].float(), atol=1e-6), key
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


def test_missing_input_is_one_line_error_before_work(tmp_path, capsys):
    code = main(["score", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "download" in err and "kd3 download" in err
    assert not (tmp_path / "score").exists()
