"""The selector registry: each built-in rule on tiny hand-made logits, held-out rows, config validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd3.config import load_config
from kd3.errors import ConfigError
from kd3.methods.selectors import (SELECTORS, Kd3DynamicParams, RandomParams, SelectionInputs,
                                   TeacherConfidenceParams, run_selector)

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo.yaml"
# 4 samples, 2 classes: teacher softmax maxima 0.8808 (z diff 2), 0.5, 0.9526 (3), 0.7311 (1)
TEACHER = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
STUDENT = torch.tensor([[0.0, 4.0], [0.0, 0.0], [0.0, 3.0], [5.0, 0.0]])


def run(name, params, **inputs):
    return SELECTORS.get(name)(SelectionInputs(teacher_logits=TEACHER, **inputs), params)


def test_all_keeps_every_sample_with_the_teachers_labels():
    r = run("all", SELECTORS.get("all").params())
    assert r.mask.tolist() == [True] * 4 and r.labels.tolist() == [0, 0, 1, 0]
    assert r.selected_per_class.tolist() == [3, 1] and r.alpha == 1.0


def test_teacher_confidence_is_a_non_strict_threshold_on_max_softmax():
    # max-softmax 0.8808, 0.5, 0.9526, 0.7311 against 0.73: samples 0, 2, 3 (0.7311 ≥ 0.73)
    r = run("teacher_confidence", TeacherConfidenceParams(threshold=0.73))
    assert r.mask.tolist() == [True, False, True, True]
    capped = run("teacher_confidence", TeacherConfidenceParams(threshold=0.73, per_class_cap=1))
    assert capped.mask.tolist() == [True, False, True, False]  # class 0 keeps its most confident one


def test_random_keeps_a_fixed_size_subset_that_depends_only_on_the_seeds():
    a = run("random", RandomParams(count=2), epoch=0, seed=5)
    b = run("random", RandomParams(count=2), epoch=3, seed=5)
    c = run("random", RandomParams(fraction=0.5, seed=1), epoch=0, seed=5)
    assert int(a.mask.sum()) == 2 and a.mask.tolist() == b.mask.tolist()  # the same every epoch
    assert int(c.mask.sum()) == 2
    expected = torch.zeros(4, dtype=torch.bool)
    expected[torch.randperm(4, generator=torch.Generator().manual_seed(5 * 1_000_003))[:2]] = True
    assert a.mask.tolist() == expected.tolist()
    with pytest.raises(ValueError):
        RandomParams(fraction=0.5, count=2)


def test_kd3_dynamic_with_alpha_one_is_teacher_only_and_needs_no_student():
    selector = SELECTORS.get("kd3_dynamic")
    params = Kd3DynamicParams(alpha=1.0, threshold=0.9)
    assert not selector.needs_student(params) and selector.needs_student(Kd3DynamicParams())
    r = run("kd3_dynamic", params)
    # n_k over c > 0.9: class 1 only (0.9526) → β = [0, 1] → τ_k = [0, 0.9·1/(2−1)] = [0, 0.9]
    assert r.thresholds.tolist() == pytest.approx([0.0, 0.9])
    assert r.mask.tolist() == [True, True, True, True] and r.alpha == 1.0


def test_kd3_dynamic_follows_the_schedule_and_combines_with_the_student():
    # reference schedule, 4 epochs: warm = 4·160/240 = 8/3, cut = 2; epoch 2 ≥ cut → α = 0 (student only)
    r = run("kd3_dynamic", Kd3DynamicParams(threshold=0.9), student_logits=STUDENT, epoch=2, total_epochs=4)
    assert r.alpha == 0.0 and r.labels.tolist() == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="alpha"):
        run("kd3_dynamic", Kd3DynamicParams())  # a stand-alone pass has no epoch for the schedule


def test_held_out_rows_are_never_selected_and_take_no_part_in_the_thresholds():
    eligible = torch.tensor([True, True, False, True])
    r = run_selector(SELECTORS.get("kd3_dynamic"), Kd3DynamicParams(alpha=1.0, threshold=0.8),
                     SelectionInputs(teacher_logits=TEACHER), eligible)
    # without row 2 the only confident sample (c > 0.8) is row 0 (class 0): τ = [0.8, 0]
    assert r.thresholds.tolist() == pytest.approx([0.8, 0.0])
    assert r.mask.tolist() == [True, False, False, False]
    assert r.labels.tolist() == [0, 0, 1, 0]  # labels of every row still reported


def test_config_validates_selector_names_and_parameters():
    cfg = load_config(DEMO, ["selectors.random.fraction=0.25", "train.selector=random"])
    assert cfg.selector_params("random").fraction == 0.25
    assert cfg.selector_params("teacher_confidence").threshold == 0.9  # from the YAML
    with pytest.raises(ConfigError, match="train.selector: unknown selector 'nope'"):
        load_config(DEMO, ["train.selector=nope"])
    with pytest.raises(ConfigError, match=r"selectors: kd3_dynamic.threshold"):
        load_config(DEMO, ["selectors.kd3_dynamic.threshold=2"])
    with pytest.raises(ConfigError, match="unknown selector 'typo'"):
        load_config(DEMO, ["selectors.typo.x=1"])
    with pytest.raises(ConfigError, match="select.student"):
        load_config(DEMO, ["select.selector=kd3_dynamic", "selectors.kd3_dynamic.alpha=0.5"])


def test_dfnd_topk_keeps_the_most_confident_per_teacher_class():
    from kd3.methods.selectors import DfndParams

    # class 0: rows 0 (0.8808), 1 (0.5), 3 (0.7311); class 1: row 2 (0.9526)
    r = run("dfnd_topk", DfndParams(per_class=2))
    assert r.mask.tolist() == [True, False, True, True]
    r = run("dfnd_topk", DfndParams(fraction=0.5))  # k = round(0.5·4/2) = 1 per class
    assert r.mask.tolist() == [True, False, True, False]


BN = torch.tensor([0.3, 2.0, 0.1, 5.0])  # lower = more in-domain
BN_LAYERS = torch.tensor([[0.2, 0.4], [1.0, 3.0], [0.0, 0.2], [9.0, 1.0]])


def test_bn_quantile_keeps_the_lowest_scores_overall_or_per_class():
    from kd3.methods.selectors import BnQuantileParams

    r = run("bn_quantile", BnQuantileParams(fraction=0.5), bn_score=BN, bn_per_layer=BN_LAYERS)
    assert r.mask.tolist() == [True, False, True, False]  # 0.1 and 0.3
    # per teacher class (labels [0, 0, 1, 0]): class 0 keeps round(0.5·3) = 2 of (0.3, 2.0, 5.0), class 1 its one
    r = run("bn_quantile", BnQuantileParams(fraction=0.5, class_balanced=True), bn_score=BN, bn_per_layer=BN_LAYERS)
    assert r.mask.tolist() == [True, True, True, False]
    # layer 1 only: 0.4, 3.0, 0.2, 1.0 → the two lowest are rows 2 and 0
    r = run("bn_quantile", BnQuantileParams(fraction=0.5, layers=[1]), bn_score=BN, bn_per_layer=BN_LAYERS)
    assert r.mask.tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="no BatchNorm"):
        run("bn_quantile", BnQuantileParams())


def test_bn_soft_draws_with_the_logistic_probability_of_the_score():
    from kd3.methods.selectors import BnSoftParams

    # quantiles of (0.1, 0.3, 2.0, 5.0) by linear interpolation: q25 = 0.25, q50 = 1.15, q75 = 2.75;
    # IQR 2.5, temperature 0.2 → scale 0.5: p = σ((1.15 − s)/0.5) = σ(1.7), σ(−1.7), σ(2.1), σ(−7.7)
    params = BnSoftParams(fraction=0.5, temperature=0.2)
    s = BN.double()
    prob = torch.sigmoid((1.15 - s) / 0.5)
    r = run("bn_soft", params, bn_score=BN, epoch=3, seed=2)
    u = torch.rand(4, generator=torch.Generator().manual_seed(2 * 1_000_003 + 7919 * 4), dtype=torch.float64)
    assert r.mask.tolist() == (u < prob).tolist()
    floor = run("bn_soft", BnSoftParams(fraction=0.5, temperature=0.2, min_prob=1.0), bn_score=BN, epoch=0)
    assert floor.mask.all()
    other_epoch = [run("bn_soft", params, bn_score=BN, epoch=e, seed=2).mask.tolist() for e in range(8)]
    assert len({tuple(m) for m in other_epoch}) > 1  # a new draw every epoch


def test_bn_selectors_fall_back_to_every_sample_for_a_teacher_without_batchnorm(caplog):
    import pandas as pd

    from kd3.data.score_cache import TeacherOutputs
    from kd3.errors import Kd3Error
    from kd3.methods.selectors import BnSoftParams
    from kd3.models.spec import InputSpec, ModelMeta
    from kd3.training.sources import SelectedPool

    meta = ModelMeta(arch="x", options={}, num_classes=2, class_names=["0", "1"],
                     input=InputSpec(image_size=8, channels=1, mean=(0.0,), std=(1.0,)))
    scores = TeacherOutputs(frame=pd.DataFrame({"uid": ["a", "b", "c", "d"]}), logits=TEACHER,
                            features=torch.zeros(4, 3), teacher=meta)  # no bn_score: no BatchNorm
    caplog.set_level("INFO", logger="kd3")
    pool = SelectedPool(SELECTORS.get("bn_soft"), BnSoftParams(), scores, [], None, 0, 8, 0, torch.device("cpu"))
    assert pool.selector.name == "all" and "fallback=all" in caplog.text
    with pytest.raises(Kd3Error, match="no BatchNorm2d"):
        SelectedPool(SELECTORS.get("bn_soft"), BnSoftParams(fallback="error"), scores, [], None, 0, 8, 0,
                     torch.device("cpu"))
