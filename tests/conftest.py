"""Shared fixtures: a toy-scale run of the demo pipeline, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "pipelines" / "demo.yaml"


def toy_overrides(tmp: Path) -> list[str]:
    """A pipeline small enough for CI: 2-epoch teacher, 124-URL pool, 2-epoch students (KD³ and plain KD),
    keeping WAKD, SMA and SWAD averages (SWAD evaluating every 2 steps of the few the toy runs)."""
    url_list = tmp / "urls.parquet"
    return [
        "run.device=cpu",
        "demo_data.teacher_epochs=2",
        "demo_data.web_mnist=90",
        "demo_data.web_natural_crops=30",
        f"demo_data.url_list={url_list}",
        f"download.url_list={url_list}",
        "download.number_sample_per_shard=50",
        "download.thread_count=4",
        "selectors.teacher_confidence.threshold=0.3",
        "train.epochs=2",
        "train.batch_size=32",
        "selectors.kd3_dynamic.threshold=0.5",
        # toy students are untrained after one epoch: once α reaches 0 nothing passes KD³'s rule, and
        # the toy tests check mechanics, so they train on the fallback instead of stopping
        "train.min_selected_fraction=0",
        "averaging.modes=[wakd,sma,swad]",
        "averaging.swad_eval_every=2",
        "averaging.sma_start_step=1",
    ]


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """Run every stage of the demo pipeline at toy scale; return (run_dir, overrides)."""
    from kd3.cli import main

    tmp = tmp_path_factory.mktemp("toy")
    run_dir = tmp / "run"
    overrides = toy_overrides(tmp)
    steps = [["demo-data"], ["download"], ["score"], ["select"], ["train"],
             ["train", "train.objective=kd", "train.selector=teacher_confidence", "train.output=train-kd"], ["average"], ["evaluate"]]
    for stage, *extra in steps:
        # a progress line at every step, so the stage logs show each loop's (toy runs are too quick for 5 s)
        code = main([stage, "--config", str(DEMO_CONFIG), "--run-dir", str(run_dir), "--progress-every", "1e-9",
                     *overrides, *extra])
        assert code == 0, f"stage {stage} {extra} failed"
    return run_dir, overrides
