"""prepare-teacher at toy scale: a generic teacher checkpoint that score → train (KD³ with feature
alignment) → evaluate use unchanged, and pool students that load as ordinary registry models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kd3.cli import main
from kd3.models import load_model, read_checkpoint
from tests.conftest import DEMO_CONFIG

pytestmark = pytest.mark.slow
GENERIC = "{run}/prepare-teacher/teacher.pt"
PREPARE = ["prepare_teacher.epochs=2", "prepare_teacher.warmup_epochs=1", "prepare_teacher.width_multipliers=[0.5,1.0]",
           "prepare_teacher.random_subnets=1"]


def test_generic_teacher_goes_through_score_train_evaluate(toy_run, tmp_path):
    run_dir, overrides = toy_run
    for stage in ("demo-data", "download"):
        shutil.copytree(run_dir / stage, tmp_path / stage)

    def stage(name, *extra):
        return main([name, "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides, *PREPARE,
                     f"score.teacher={GENERIC}", f"evaluate.teacher={GENERIC}", *extra])

    assert stage("prepare-teacher") == 0
    out = tmp_path / "prepare-teacher"
    payload = read_checkpoint(out / "teacher.pt")
    generic = payload["generic_teacher"]
    assert len(generic["pool"]) == 2 * 2 * 2  # families × widths × depths
    assert generic["pool"]["cifar_resnet-w0.5-d1"] == {"arch": "cifar_resnet",
                                                       "options": {"widths": [4, 8, 16, 32], "num_blocks": [1, 1, 1, 1]}}
    assert generic["settings"]["compat_weight"] == 1.0 and generic["eval_top1_after"] is not None
    original = read_checkpoint(run_dir / "demo-data" / "teacher.pt")
    assert payload["model"] == original["model"]  # same architecture and preprocessing: a drop-in teacher
    assert any(not torch.equal(payload["state_dict"][k], original["state_dict"][k]) for k in original["state_dict"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["teacher_updated"] for m in metrics] == [False, True]  # warm-up: the supernet learns alone
    for name in generic["pool"]:
        model, meta, _ = load_model(out / "students" / f"{name}.pt")
        assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10) and meta.arch == generic["pool"][name]["arch"]
    # a finished stage with the same settings is reused; other settings need --overwrite
    assert stage("prepare-teacher", "--resume") == 0
    assert stage("prepare-teacher", "--resume", "prepare_teacher.compat_weight=0.5") == 2

    # the generic teacher downstream, unchanged: KD³ with feature alignment into a pool member
    student = ["train.student.arch=cifar_resnet", "train.student.options={widths: [4, 8, 16, 32], num_blocks: [1, 1, 1, 1]}"]
    assert stage("score") == 0
    assert stage("train", "train.objective=kd3", "kd3.feature_alignment=on", *student) == 0
    students = "evaluate.students={kd3: '{run}/train/last.pt', pool: '{run}/prepare-teacher/students/small_cnn-w0.5-d1.pt'}"
    assert stage("evaluate", students) == 0
    report = json.loads((tmp_path / "evaluate" / "report.json").read_text())
    assert str(tmp_path / "prepare-teacher" / "teacher.pt") in json.dumps(report)
    assert {"kd3", "pool"} <= set(json.dumps(report).replace('"', " ").split())
