"""Summary numbers of the hand-built 2-epoch run (see test_inspect_fixtures for the table)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import kd3.inspect.manifests as manifests
from kd3.errors import Kd3Error
from kd3.inspect.manifests import find_manifests, pick_manifests
from kd3.inspect.summary import format_summary, summarize_run

from tests.unit.test_inspect_fixtures import CLASS_NAMES, build_run


@pytest.fixture
def run(tmp_path):
    return build_run(tmp_path)


def test_run_has_select_then_epoch_manifests_in_order(run):
    assert [r.name for r in find_manifests(run)] == ["select", "epoch 0", "epoch 1"]


def test_per_class_counts_thresholds_alpha_and_churn_match_the_hand_table(run):
    s = summarize_run(run, bins=20)
    sel, e0, e1 = s.manifests
    assert s.class_names == CLASS_NAMES
    assert (e0.rows, e0.selected, e1.selected) == (6, 3, 4)
    assert e0.selected_per_class.tolist() == [1, 1, 1]
    assert e1.selected_per_class.tolist() == [2, 0, 2]
    assert e1.pool_per_class.tolist() == [2, 1, 3]
    np.testing.assert_allclose(e0.thresholds, [0.9, 0.7, 0.95], rtol=1e-6)
    np.testing.assert_allclose(e1.thresholds, [0.8, 0.75, 0.96], rtol=1e-6)
    assert e0.alpha == pytest.approx(0.8) and e1.alpha == pytest.approx(0.5)
    # churn: u1 and u3 entered, u2 left; the first epoch has no predecessor
    assert (e0.churn_in, e0.churn_out) == (None, None)
    assert (e1.churn_in, e1.churn_out) == (2, 1)
    assert (e1.trained, e1.mean_weight) == (4, pytest.approx(0.5))
    assert e1.dominant_class == 0  # a tie between classes 0 and 2 goes to the first
    # the select stage's manifest: teacher columns, no τ/α, never part of the churn chain
    assert (sel.label_column, sel.thresholds, sel.alpha, sel.churn_in) == ("teacher_label", None, None, None)
    assert sel.selected_per_class.tolist() == [1, 1, 1]


def test_confidence_histogram_bins(run):
    e1 = summarize_run(run, bins=20).manifests[-1]
    # selected 0.97, 0.91, 0.97, 0.99 → bins 19, 18, 19, 19; rejected 0.65, 0.41 → bins 13, 8
    expected_sel, expected_rej = np.zeros(20, int), np.zeros(20, int)
    expected_sel[[18, 19]] = [1, 3]
    expected_rej[[8, 13]] = [1, 1]
    assert e1.hist_selected.tolist() == expected_sel.tolist()
    assert e1.hist_rejected.tolist() == expected_rej.tolist()


def test_streaming_in_tiny_batches_gives_the_same_numbers(run, monkeypatch):
    whole = summarize_run(run, bins=10).to_dict()
    monkeypatch.setattr(manifests, "BATCH_ROWS", 2)
    assert summarize_run(run, bins=10).to_dict() == whole


def test_pool_and_metrics_reach_the_summary_and_text(run):
    s = summarize_run(run)
    assert s.pool["failures_by_reason"] == {"http 404": 1, "timeout": 1}
    assert s.metrics[1]["train_agreement"] == pytest.approx(0.7)
    text = format_summary(s)
    for expected in ("failed: http 404", "epoch 1", "τ two", "entered", "0.960"):
        assert expected in text
    row = next(line for line in text.splitlines() if line.strip().startswith("epoch 1"))
    assert row.split()[2:5] == ["6", "4", "0.667"]  # rows, selected, share


def test_json_summary_has_no_nan(run):
    d = summarize_run(run).to_dict()
    sel = d["manifests"][0]
    assert sel["class_thresholds"] is None and sel["alpha"] is None
    assert d["manifests"][2]["selected_per_class"] == {"zero": 2, "one": 0, "two": 2}
    assert not any(isinstance(v, float) and math.isnan(v) for v in d["manifests"][2]["class_thresholds"].values())


def test_select_only_run_is_enough(tmp_path):
    run = build_run(tmp_path, epochs=False)
    s = summarize_run(run)
    assert [m.name for m in s.manifests] == ["select"] and s.final.selected == 3
    assert pick_manifests(run, None)[0].epoch is None


def test_pick_manifests_resolves_epoch_values(run):
    assert [r.epoch for r in pick_manifests(run, None)] == [1]
    assert [r.epoch for r in pick_manifests(run, "0")] == [0]
    assert [r.epoch for r in pick_manifests(run, "all")] == [0, 1]
    assert pick_manifests(run, "select")[0].epoch is None
    with pytest.raises(Kd3Error, match="--epoch 7: no such manifest"):
        pick_manifests(run, "7")
    with pytest.raises(Kd3Error, match="expected an epoch number"):
        pick_manifests(run, "final")


def test_a_run_without_manifests_names_the_stages_to_run(tmp_path):
    run = build_run(tmp_path, epochs=False, select=False)
    with pytest.raises(Kd3Error, match="kd3 train.*kd3 select"):
        find_manifests(run)
