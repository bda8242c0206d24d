"""A selector is one registered function: registered here, in the test, it trains a student."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from pydantic import Field

from kd3.cli import main
from kd3.methods.selection import SelectionResult
from kd3.methods.selectors import SELECTORS, register_selector
from kd3.params import Params
from tests.conftest import DEMO_CONFIG

pytestmark = pytest.mark.slow


class EveryNthParams(Params):
    n: int = Field(default=2, ge=1)


@pytest.fixture
def every_nth():
    """Keep every n-th pool row whose teacher label is even; records each call's epoch."""
    calls = []

    @register_selector("test_every_nth", EveryNthParams)
    def select(inputs, params):
        calls.append(inputs.epoch)
        labels = inputs.teacher_logits.argmax(1)
        mask = (torch.arange(len(labels)) % params.n == 0) & (labels % 2 == 0)
        k = inputs.teacher_logits.shape[1]
        return SelectionResult(mask=mask, labels=labels, confidences=inputs.teacher_logits.softmax(1).max(1).values,
                               thresholds=torch.zeros(k), counts=torch.bincount(labels, minlength=k),
                               selected_per_class=torch.bincount(labels[mask], minlength=k), fallback_used=False,
                               dominant_class=None)

    yield calls
    SELECTORS.unregister("test_every_nth")


def test_a_selector_registered_in_the_test_trains_a_student(toy_run, tmp_path, every_nth):
    run_dir, overrides = toy_run
    for stage in ("demo-data", "download", "score"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    args = ["train", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides,
            "train.objective=kd", "train.selector=test_every_nth", "selectors.test_every_nth.n=3",
            "averaging.modes=[]"]
    assert main(args) == 0
    assert every_nth == [0, 1]  # run once per epoch, with the epoch
    scores = pd.read_parquet(tmp_path / "score" / "teacher_outputs.parquet", columns=["uid", "teacher_label"])
    expected = {uid for i, (uid, label) in enumerate(zip(scores["uid"], scores["teacher_label"]))
                if i % 3 == 0 and label % 2 == 0}
    metrics = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    for epoch, record in enumerate(metrics):
        manifest = pd.read_parquet(tmp_path / "train" / "selection" / f"epoch_{epoch:03d}.parquet")
        assert set(manifest.loc[manifest["selected"], "uid"]) == expected
        assert record["selected"] == record["samples"] == len(expected)
    meta = json.loads((tmp_path / "train" / "meta.json").read_text())
    assert meta["config"]["selectors"]["test_every_nth"] == {"n": 3}


def test_an_unknown_selector_or_parameter_is_a_one_line_error(toy_run, tmp_path, every_nth, capsys):
    _, overrides = toy_run
    base = ["train", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides]
    assert main([*base, "train.selector=test_every_nthh"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.selector" in err and "test_every_nth" in err and "\n" not in err
    assert main([*base, "train.selector=test_every_nth", "selectors.test_every_nth.n=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "selectors" in err and "test_every_nth.n" in err and "\n" not in err
    assert not (tmp_path / "train").exists()
