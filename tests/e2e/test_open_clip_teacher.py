"""A tiny open_clip zero-shot teacher (3×64×64 input) distilled into a grey 16-px demo CNN student
through score → train (KD³ and plain KD) → evaluate: preprocessing travels with each model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kd3.cli import main
from tests.conftest import DEMO_CONFIG

pytestmark = pytest.mark.slow
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kd3-tiny-rn.json"


def test_open_clip_zero_shot_teacher_into_a_small_cnn_student(toy_run, tmp_path):
    run_dir, overrides = toy_run
    shutil.copytree(run_dir / "download", tmp_path / "download")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]))
    teacher = tmp_path / "clip_teacher.pt"
    assert main(["zeroshot-teacher", "--model", "kd3-tiny-rn", "--model-config", str(FIXTURE),
                 "--classes", str(classes), "--out", str(teacher)]) == 0
    common = ["--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides, f"score.teacher={teacher}",
              f"evaluate.teacher={teacher}", "train.epochs=1", "train.student_input.channels=1",
              "train.student_input.image_size=16", "train.student_input.mean=[0.2]", "train.student_input.std=[0.3]",
              "selectors.kd3_dynamic.alpha=1", "selectors.kd3_dynamic.threshold=0.1"]
    private = run_dir / "demo-data" / "private_test.npz"
    assert main(["score", *common]) == 0
    score_meta = json.loads((tmp_path / "score" / "meta.json").read_text())
    assert score_meta["teacher"]["input"]["channels"] == 3 and score_meta["teacher"]["input"]["image_size"] == 64
    assert main(["train", *common]) == 0
    assert main(["train", *common, "train.objective=kd", "train.selector=all", "train.output=train-kd"]) == 0
    assert main(["average", *common]) == 0
    assert main(["evaluate", *common, f"evaluate.datasets=[{{name: private_test, path: {private}}}]"]) == 0
    report = json.loads((tmp_path / "evaluate" / "report.json").read_text())
    assert {r["model"] for r in report["rows"]} == {"teacher", "kd3", "kd3-wakd", "kd3-sma", "kd"}
    last = json.loads((tmp_path / "train" / "meta.json").read_text())
    assert last["status"] == "complete"
    from kd3.models import load_model

    _, student_meta, _ = load_model(tmp_path / "train" / "last.pt")
    assert student_meta.input.channels == 1 and student_meta.input.image_size == 16
