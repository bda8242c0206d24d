"""The hard scenario's demo-data stage at toy size: a 3-channel 24 px teacher, shifted RGB digits, more
distractors than digits, ground truth beside the pool, and the shifted held-out test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kd3.cli import main
from kd3.models import load_model
from tests.conftest import REPO

pytestmark = pytest.mark.slow
HARD_CONFIG = REPO / "pipelines" / "hard.yaml"


def test_hard_demo_data_writes_shifted_rgb_pool_and_tests(tmp_path):
    url_list = tmp_path / "urls.parquet"
    run_dir = tmp_path / "run"
    args = ["demo-data", "--config", str(HARD_CONFIG), "--run-dir", str(run_dir), "run.device=cpu",
            "demo_data.teacher_epochs=1", "demo_data.teacher.options={widths: [4, 8, 8]}",
            "demo_data.web_mnist=20", "demo_data.web_natural_crops=30", f"demo_data.url_list={url_list}"]
    assert main(args) == 0
    out = run_dir / "demo-data"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "complete"
    counts = meta["counts"]
    assert counts["web_by_source"] == {"natural": 30, "mnist": 20, "broken": 4}
    assert counts["mnist_shifted_test"] == 5000 - 20 and 0 <= counts["teacher_mnist_shifted_test_acc"] <= 1

    model, model_meta, _ = load_model(out / "teacher.pt")
    assert (model_meta.input.channels, model_meta.input.image_size) == (3, 24)
    assert len(model_meta.input.mean) == len(model_meta.input.std) == 3

    with np.load(out / "private_test.npz") as data:
        assert data["images"].shape[1:] == (3, 24, 24) and data["images"].dtype == np.uint8
        # peach ink [255, 200, 120]: the blue channel never exceeds 120
        assert data["images"][:, 2].max() <= 120 and len(data["labels"]) == len(data["images"])
    with np.load(out / "mnist_shifted_test.npz") as data:
        assert data["images"].shape == (4980, 28, 28, 3) and set(np.unique(data["labels"])) == set(range(10))

    urls = pd.read_parquet(url_list)
    assert list(urls.columns) == ["url", "source", "demo_label"]
    assert urls["url"].str.startswith("http://127.0.0.1:{port}/").all()
    digits = urls[urls["source"] == "mnist"]
    assert digits["demo_label"].between(0, 9).all() and (urls.loc[urls["source"] != "mnist", "demo_label"] == -1).all()
    first = out / "web" / digits["url"].iloc[0].split("{port}/", 1)[1]
    with Image.open(first) as image:
        assert image.mode == "RGB" and image.size == (28, 28)
    # a second run with the same seed writes the same pool (shifts drawn from the seed)
    again = tmp_path / "again"
    assert main([*args[:3], "--run-dir", str(again), *args[5:-1], f"demo_data.url_list={tmp_path / 'u2.parquet'}"]) == 0
    assert Path(again / "demo-data" / "web" / first.relative_to(out / "web")).read_bytes() == first.read_bytes()
