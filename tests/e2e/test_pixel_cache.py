"""The score stage's caches (decoded pixels, teacher feature maps) change speed, never results."""

import shutil

import numpy as np
import pytest
import torch

from kd3 import layout
from kd3.cli import main
from kd3.data.score_cache import load_teacher_outputs
from kd3.data.shards import ShardImages, list_shards
from kd3.models.spec import InputSpec
from tests.conftest import DEMO_CONFIG

pytestmark = pytest.mark.slow


def test_score_writes_the_pool_decoded_once(toy_run):
    run_dir, _ = toy_run
    scores = load_teacher_outputs(run_dir)
    assert scores.pixels is not None
    assert scores.pixels.pixels.shape[0] == len(scores.frame)
    # the demo pool mixes grey MNIST digits with colour crops: both kinds are cached
    assert set(np.unique(scores.pixels.channels)) == {1, 3}
    assert scores.feature_maps is not None and scores.feature_maps.shape[0] == len(scores.frame)


def test_cached_items_equal_decoded_items(toy_run):
    run_dir, _ = toy_run
    scores = load_teacher_outputs(run_dir)
    shards = list_shards(run_dir / layout.DOWNLOAD)
    student = InputSpec(image_size=12, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    uids = list(scores.frame["uid"])
    subset = {uid: i for i, uid in enumerate(uids[::3])}  # rows renumbered, as evaluate and average do
    for mapping in (scores.uid_to_row, subset):
        kwargs = dict(uid_to_row=mapping, shuffle=True, shuffle_buffer=16, seed=3, epoch=1,
                      teacher_spec=scores.teacher.input)
        decoded = list(ShardImages(shards, student, **kwargs))
        cached = list(ShardImages(shards, student, pixels=scores.pixels, **kwargs))
        assert [i["uid"] for i in cached] == [i["uid"] for i in decoded]
        assert [i["row"] for i in cached] == [i["row"] for i in decoded]
        assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["teacher_image"], b["teacher_image"])
                   for a, b in zip(cached, decoded))


def test_training_is_bit_identical_without_the_caches(toy_run, tmp_path):
    run_dir, overrides = toy_run
    run = tmp_path / "run"
    for stage in (layout.DEMO_DATA, layout.DOWNLOAD, layout.SCORE):
        shutil.copytree(run_dir / stage, run / stage)
    args = ["train", "--config", str(DEMO_CONFIG), "--run-dir", str(run), *overrides, "train.epochs=1",
            "train.extra_losses=[nd]"]
    assert main([*args, "train.output=train-cached"]) == 0
    (run / layout.SCORE / layout.PIXEL_CACHE).unlink()
    (run / layout.SCORE / layout.FEATURE_MAP_CACHE).unlink()
    assert main([*args, "train.output=train-decoded"]) == 0
    a = torch.load(run / "train-cached" / layout.LAST_CHECKPOINT, weights_only=True)
    b = torch.load(run / "train-decoded" / layout.LAST_CHECKPOINT, weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
