"""The bad-input zoo, run-folder part: upstream outputs changed, replaced or missing after a stage
finished, on a copy of the toy run (tests/conftest.py). Every refusal leaves the folders as they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kd3.cli import main
from tests.conftest import DEMO_CONFIG
from tests.zoo import make_zoo

pytestmark = pytest.mark.slow


@pytest.fixture
def run(toy_run, tmp_path):
    """A copy of the toy run's demo-data, download and score folders; (run_dir, overrides)."""
    source, overrides = toy_run
    run_dir = tmp_path / "run"
    for stage in ("demo-data", "download", "score"):
        shutil.copytree(source / stage, run_dir / stage, symlinks=True)
    return run_dir, overrides


def kd3(run, *args) -> int:
    run_dir, overrides = run
    return main([args[0], "--config", str(DEMO_CONFIG), "--run-dir", str(run_dir), *overrides, *args[1:]])


def test_train_refuses_a_teacher_other_than_the_one_score_cached(run, tmp_path, capsys):
    teacher = run[0] / "demo-data" / "teacher.pt"
    for other in (make_zoo.other_teacher(teacher, tmp_path), make_zoo.other_teacher(teacher, tmp_path, num_classes=5)):
        assert kd3(run, "train", f"score.teacher={other}", "train.epochs=1") == 2
        err = capsys.readouterr().err
        assert f"score.teacher {other} is not the teacher whose outputs" in err
        assert not (run[0] / "train").exists()
        assert kd3(run, "train", f"score.teacher={other}", "--dry-run") == 2  # dry-run runs the same checks


def test_shards_truncated_after_download_are_refused_before_score_overwrites(run, capsys):
    cache = run[0] / "score" / "teacher_outputs.parquet"
    before = cache.read_bytes()
    make_zoo.truncate_shard(run[0])
    assert kd3(run, "score", "--overwrite") == 2
    err = capsys.readouterr().err
    assert "the outputs of" in err and "download changed after it finished (shards.00000" in err
    assert cache.read_bytes() == before  # the good cache was not deleted
    assert kd3(run, "train", "train.epochs=1") == 2
    assert "shards.00000" in capsys.readouterr().err
    assert kd3(run, "score", "--dry-run") == 2


def test_truncated_shard_fails_score_by_its_skipped_share(run, capsys):
    """A shard already truncated when download recorded it (here: an older download without
    fingerprints): score fails instead of completing on a fraction of the pool."""
    make_zoo.forget_outputs(run[0], "download")
    make_zoo.truncate_shard(run[0], keep=0.1)
    assert kd3(run, "score", "--overwrite") == 2  # a Kd3Error inside the stage
    err = capsys.readouterr().err
    assert "could not be read, more than score.max_skipped_fraction=0.01" in err
    assert json.loads((run[0] / "score" / "meta.json").read_text())["status"] == "failed"
    # raising the gate lets the failed stage resume (the key is not part of the resume fingerprint)
    assert kd3(run, "score", "--resume", "score.max_skipped_fraction=1") == 0


@pytest.mark.parametrize("teacher_maker", ["pickled", "wrong_arch"])
def test_bad_teacher_fails_before_score_overwrite_deletes_the_cache(run, tmp_path, capsys, teacher_maker):
    cache = run[0] / "score" / "teacher_outputs.parquet"
    before = cache.read_bytes()
    teacher = run[0] / "demo-data" / "teacher.pt"
    bad = make_zoo.pickled_checkpoint(tmp_path) if teacher_maker == "pickled" else \
        make_zoo.wrong_architecture(teacher, tmp_path)
    assert kd3(run, "score", "--overwrite", f"score.teacher={bad}") == 2
    err = capsys.readouterr().err
    assert str(bad) in err and len(err.strip().splitlines()) == 1
    assert cache.read_bytes() == before
    assert json.loads((run[0] / "score" / "meta.json").read_text())["status"] == "complete"


def test_missing_or_replaced_score_cache_is_named_by_select_and_train(run, capsys):
    cache = run[0] / "score" / "teacher_outputs.parquet"
    saved = cache.read_bytes()
    cache.unlink()
    for stage in ("select", "train"):
        assert kd3(run, stage, "--dry-run") == 2
        assert "teacher_outputs.parquet" in capsys.readouterr().err
    cache.write_bytes(saved[: len(saved) // 2])  # truncated: unreadable footer
    assert kd3(run, "select") == 2
    assert "unreadable score cache" in capsys.readouterr().err
    assert not (run[0] / "select").exists()


def test_no_cuda_fails_before_score_overwrite(run, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    cache = run[0] / "score" / "teacher_outputs.parquet"
    assert kd3(run, "score", "--overwrite", "run.device=cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert cache.is_file()
