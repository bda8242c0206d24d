"""A collapsed selection is a failure, not a success: one line naming the cause and the key to change."""

from __future__ import annotations

import json
import shutil

import pytest

from kd3.cli import main
from tests.conftest import DEMO_CONFIG

pytestmark = pytest.mark.slow


def test_a_selection_where_nothing_passes_stops_the_run_unless_allowed(toy_run, tmp_path, capsys):
    run_dir, overrides = toy_run
    for stage in ("demo-data", "download", "score"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    # θ = 1: no confidence is strictly above 1, so every class threshold is 1 and nothing passes
    args = ["train", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides, "train.epochs=1",
            "train.selector=kd3_dynamic", "selectors.kd3_dynamic.threshold=1.0", "averaging.modes=[]",
            "train.min_selected_fraction=0.01"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nothing passed" in err and "train.min_selected_fraction" in err
    assert json.loads((tmp_path / "train" / "meta.json").read_text())["status"] == "failed"
    assert main([*args, "--overwrite", "train.min_selected_fraction=0"]) == 0
    assert "nothing passed the thresholds" in capsys.readouterr().out


def test_a_selection_below_the_floor_stops_the_run(toy_run, tmp_path, capsys):
    run_dir, overrides = toy_run
    for stage in ("demo-data", "download", "score"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    args = ["train", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides, "train.epochs=1",
            "train.objective=kd", "train.selector=random", "selectors.random.count=2", "averaging.modes=[]",
            "train.min_selected_fraction=0.05"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 sample(s) selected" in err and "collapsed" in err
