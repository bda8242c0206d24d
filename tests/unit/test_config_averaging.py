"""The averaging / average / ND / evaluation keys: validation, and fingerprints of older run folders."""

from pathlib import Path

import pytest

from kd3.config import load_config
from kd3.errors import ConfigError

CIFAR = Path(__file__).resolve().parents[2] / "pipelines" / "cifar_web.yaml"
DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo.yaml"


def test_later_keys_at_their_defaults_leave_the_train_fingerprint_unchanged():
    cfg = load_config(CIFAR)
    assert cfg.averaging.modes == [] and cfg.train.extra_losses == []
    # a train folder written before the averaging section and the ND keys existed still resumes
    assert cfg.fingerprint("train", "kd3", "averaging") == cfg.fingerprint("train", "kd3")
    for override in ("averaging.modes=[wakd]", "train.extra_losses=[nd]", "train.nd_weight=0.5",
                     "averaging.swad_eval_every=7"):
        changed = load_config(CIFAR, [override])
        assert changed.fingerprint("train", "kd3", "averaging") != cfg.fingerprint("train", "kd3"), override


def test_demo_keeps_the_averages_that_leave_training_unchanged_and_evaluates_them():
    cfg = load_config(DEMO)
    assert cfg.averaging.modes == ["wakd", "sma"]  # SWAD would hold out part of the pool
    assert {"kd3", "kd3-wakd", "kd3-sma", "kd"} == set(cfg.evaluate.students)
    assert cfg.evaluate.ece_bins == 15


@pytest.mark.parametrize("override, key", [
    ("averaging.modes=[wakd,wakd]", "averaging.modes"),
    ("averaging.modes=[ema]", "averaging.modes"),
    ("averaging.val_fraction=0", "averaging.val_fraction"),
    ("train.extra_losses=[nd,nd]", "train.extra_losses"),
    ("train.nd_dropout=1.0", "train.nd_dropout"),
    ("evaluate.datasets=[{name: x, path: y, format: zip}]", "evaluate.datasets.0.format"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEMO, [override])
