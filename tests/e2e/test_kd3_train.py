"""KD³ training at toy scale: per-epoch selection manifests, no teacher re-run for selection, exact resume."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

import kd3.training.objectives as objectives_module
from kd3.cli import main
from tests.conftest import DEMO_CONFIG

pytestmark = pytest.mark.slow
# the paper's loss parts (the pipelines switch the teacher-side contrastive term off by default)
KD3 = ["train.objective=kd3", "train.selector=kd3_dynamic", "train.epochs=3", "selectors.kd3_dynamic.threshold=0.5",
       "kd3.teacher_contrastive=on"]


def upstream_copy(toy_run, dest):
    run_dir, overrides = toy_run
    for stage in ("demo-data", "download", "score", "select"):
        shutil.copytree(run_dir / stage, dest / stage)
    return overrides


def train(dest, overrides, *extra):
    return main(["train", "--config", str(DEMO_CONFIG), "--run-dir", str(dest), *overrides, *KD3, *extra])


def test_kd3_writes_a_selection_manifest_per_epoch_and_a_deployable_student(toy_run, tmp_path):
    overrides = upstream_copy(toy_run, tmp_path)
    assert train(tmp_path, overrides) == 0
    frames = [pd.read_parquet(tmp_path / "train" / "selection" / f"epoch_{e:03d}.parquet") for e in range(3)]
    columns = {"uid", "url", "shard", "key", "epoch", "selected", "teacher_label", "teacher_conf", "student_label",
               "student_conf", "combined_label", "combined_conf", "class_threshold", "alpha", "weight"}
    scored = pd.read_parquet(tmp_path / "score" / "teacher_outputs.parquet", columns=["uid"])
    for e, frame in enumerate(frames):
        assert columns <= set(frame.columns) and (frame["epoch"] == e).all()
        assert sorted(frame["uid"]) == sorted(scored["uid"])  # one row per pool sample
        trained = frame["weight"].notna()
        assert (trained <= frame["selected"]).all() and trained.any()
        assert frame.loc[trained, "weight"].between(0.5, 1.0).all()  # sigmoid of a norm ≥ 0.5
    metrics = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    for m, frame in zip(metrics, frames):
        assert m["selected"] == int(frame["selected"].sum())
        assert sum(m["selected_per_class"].values()) == m["selected"]
        assert len(m["class_thresholds"]) == 10 and {"loss_fa", "loss_con_s", "loss_con_t"} <= set(m)
        assert m["alpha"] == pytest.approx(float(frame["alpha"].iloc[0]), abs=1e-6)
    from kd3.models import load_student

    student = load_student(tmp_path / "train" / "last.pt")
    assert student(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_selection_uses_cached_teacher_logits_never_a_teacher_pass_over_the_pool(toy_run, tmp_path, monkeypatch):
    overrides = upstream_copy(toy_run, tmp_path)
    seen = {"teacher_images": 0}
    real_load = objectives_module.load_model

    def counting_load(path, device="cpu"):
        model, meta, payload = real_load(path, device)
        original = model.extract

        def extract(x):
            seen["teacher_images"] += len(x)
            return original(x)

        model.extract = extract
        model.forward = lambda x: (_ for _ in ()).throw(AssertionError("teacher logits must come from the cache"))
        return model, meta, payload

    monkeypatch.setattr(objectives_module, "load_model", counting_load)
    assert train(tmp_path, overrides, "kd3.teacher_contrastive=off") == 0
    # the score stage cached the teacher's feature maps: the teacher never runs at all
    assert seen["teacher_images"] == 0
    (tmp_path / "score" / "teacher_feature_maps.npy").unlink()
    assert train(tmp_path, overrides, "kd3.teacher_contrastive=off", "--overwrite") == 0
    metrics = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    # without that cache it runs only on the images trained on (for its feature maps), never over the pool
    assert seen["teacher_images"] == sum(m["samples"] for m in metrics)


def test_plain_kd_train_does_not_even_load_the_teacher(toy_run, tmp_path, monkeypatch):
    run_dir, overrides = toy_run
    for stage in ("demo-data", "download", "score", "select"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    monkeypatch.setattr(objectives_module, "load_model", lambda *a, **k: pytest.fail("teacher loaded"))
    assert main(["train", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides,
                 "train.objective=kd", "train.selector=teacher_confidence", "train.epochs=1"]) == 0


def test_resume_after_a_kill_reproduces_the_uninterrupted_selections_and_weights(toy_run, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    overrides = upstream_copy(toy_run, full)
    upstream_copy(toy_run, cut)
    assert train(full, overrides) == 0
    # "kill" during epoch 2: same run, then rewind it to the state right after epoch 1 (status running)
    assert train(cut, overrides) == 0
    for e in (1, 2):
        (cut / "train" / f"epoch_{e:03d}.pt").unlink()
        (cut / "train" / "selection" / f"epoch_{e:03d}.parquet").unlink()
    shutil.copyfile(cut / "train" / "epoch_000.pt", cut / "train" / "last.pt")
    meta = json.loads((cut / "train" / "meta.json").read_text())
    meta["status"] = "running"
    (cut / "train" / "meta.json").write_text(json.dumps(meta))
    assert train(cut, overrides, "--resume") == 0
    for e in (1, 2):
        a = pd.read_parquet(full / "train" / "selection" / f"epoch_{e:03d}.parquet")
        b = pd.read_parquet(cut / "train" / "selection" / f"epoch_{e:03d}.parquet")
        pd.testing.assert_frame_equal(a.drop(columns=["weight", "student_conf", "combined_conf"]),
                                      b.drop(columns=["weight", "student_conf", "combined_conf"]))
        assert (a["student_conf"] - b["student_conf"]).abs().max() < 1e-5
    sa = torch.load(full / "train" / "last.pt", weights_only=True)["state_dict"]
    sb = torch.load(cut / "train" / "last.pt", weights_only=True)["state_dict"]
    for key in sa:
        assert torch.allclose(sa[key].float(), sb[key].float(), atol=1e-5), key


def test_standalone_select_applies_the_dynamic_rule_with_a_student_and_alpha(toy_run, tmp_path, capsys):
    run_dir, overrides = toy_run
    for stage in ("demo-data", "download", "score", "train"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    base = ["select", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides,
            "select.selector=kd3_dynamic"]
    assert main([*base, "selectors.kd3_dynamic.alpha=0.5"]) == 2
    assert "select.student" in capsys.readouterr().err
    assert main([*base, "selectors.kd3_dynamic.alpha=0.5", "select.student={run}/train/last.pt"]) == 0
    manifest = pd.read_parquet(tmp_path / "select" / "manifest.parquet")
    per_epoch = pd.read_parquet(tmp_path / "train" / "selection" / "epoch_001.parquet")
    assert set(per_epoch.columns) <= set(manifest.columns)
    assert (manifest["epoch"] == -1).all() and (manifest["alpha"] == 0.5).all()
    assert manifest["student_conf"].notna().all() and manifest["weight"].isna().all()
    # the selected flag is exactly the rule: combined confidence above the combined class's threshold
    assert (manifest["selected"] == (manifest["combined_conf"] > manifest["class_threshold"])).all() or \
        json.loads((tmp_path / "select" / "meta.json").read_text())["counts"]["fallback_used"]
