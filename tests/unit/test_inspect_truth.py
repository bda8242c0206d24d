"""Ground truth in the inspect summary: purity, in-domain recall, per-class recall, the absorption warning.

The hand-built run and its URL list are described in test_inspect_fixtures; every expected number
below is read off that table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import kd3.inspect.manifests as manifests
from kd3.inspect.manifests import uid_hashes
from kd3.inspect.summary import format_summary, summarize_run, tables, warning_lines
from kd3.inspect.truth import TruthSettings, load_ground_truth

from tests.unit.test_inspect_fixtures import CLASS_NAMES, UIDS, build_run, epoch_frame, url_list_frame, write_url_list

#: the warnings' sample floor off, so the six-sample run can trip them
ANY_COUNT = TruthSettings(warn_min_samples=1)


@pytest.fixture
def run(tmp_path):
    return build_run(tmp_path, url_list=True)


def _epoch1_with(run, **columns):
    """Rewrite epoch 1's manifest with some columns replaced (a planted selection)."""
    frame = epoch_frame(1)
    for name, values in columns.items():
        frame[name] = np.asarray(values, dtype=frame[name].dtype)
    frame.to_parquet(run / "train" / "selection" / "epoch_001.parquet", index=False)


def test_purity_and_recall_match_the_hand_table(run):
    s = summarize_run(run)
    sel, e0, e1 = s.manifests
    assert s.truth["column"] == "source" and s.truth["in_domain_value"] == "mnist"
    assert (s.truth["urls"], s.truth["in_domain_urls"]) == (8, 5)  # u7 is in the list, not in the manifests
    assert s.truth_note is None
    for m in (sel, e0):
        t = m.truth
        assert (t.known, t.in_domain, t.selected_known, t.selected_in_domain, t.distractors) == (6, 4, 3, 3, 0)
        assert t.purity == pytest.approx(1.0) and t.recall == pytest.approx(0.75)
        np.testing.assert_allclose(t.class_recall, [1.0, 0.5, 1.0])
        assert t.distractors_per_class.tolist() == [0, 0, 0]
    t = e1.truth
    assert (t.selected_known, t.selected_in_domain, t.distractors) == (4, 2, 2)
    assert t.purity == pytest.approx(0.5) and t.recall == pytest.approx(0.5)
    assert t.true_per_class.tolist() == [1, 2, 1] and t.true_selected_per_class.tolist() == [1, 0, 1]
    np.testing.assert_allclose(t.class_recall, [1.0, 0.0, 1.0])
    assert t.distractors_per_class.tolist() == [1, 0, 1]  # u1 as class 0, u3 as class 2 (combined_label)


def test_tables_text_and_json_carry_the_ground_truth(run):
    s = summarize_run(run)
    titles = [t.title for t in tables(s)]
    assert titles.index("Ground truth per manifest") == titles.index("Selection per manifest") + 1
    assert "In-domain recall per true class" in titles
    gt, recall = (next(t for t in tables(s) if t.anchor == a) for a in ("ground-truth", "class-recall"))
    assert gt.header == ["manifest", "selected", "in-domain sel.", "distractors sel.", "purity", "in-domain recall",
                         "top distractor class", "its share"]
    assert gt.rows == [["select", "3", "3", "0", "1.000", "0.750", "—", "—"],
                       ["epoch 0", "3", "3", "0", "1.000", "0.750", "—", "—"],
                       ["epoch 1", "4", "2", "2", "0.500", "0.500", "zero", "0.500"]]  # a tie: the first class
    assert recall.header == ["class", "in-domain", "sel", "e0", "e1"]
    assert recall.rows == [["zero", "1", "1.000", "1.000", "1.000"], ["one", "2", "0.500", "0.500", "0.000"],
                           ["two", "1", "1.000", "1.000", "1.000"]]
    text = format_summary(s)
    assert "Ground truth per manifest" in text and "In-domain recall per true class" in text
    assert ["epoch", "1", "4", "2", "2", "0.500", "0.500", "zero", "0.500"] in [line.split() for line in text.splitlines()]
    d = s.to_dict()
    e1 = d["manifests"][2]["ground_truth"]
    assert e1["purity"] == 0.5 and e1["in_domain_recall"] == 0.5 and e1["selected_distractors"] == 2
    assert e1["recall_per_true_class"] == {"zero": 1.0, "one": 0.0, "two": 1.0}
    assert e1["distractors_per_class"] == {"zero": 1, "one": 0, "two": 1}
    assert d["ground_truth"]["available"] is True and d["warnings"] == [] and d["warning_text"] == []


def test_streaming_in_tiny_batches_gives_the_same_ground_truth(run, monkeypatch):
    whole = summarize_run(run).to_dict()
    monkeypatch.setattr(manifests, "BATCH_ROWS", 2)
    assert summarize_run(run).to_dict() == whole


def test_no_warning_for_a_tie_or_below_the_sample_floor(run):
    assert summarize_run(run, truth=ANY_COUNT).absorptions == []  # distractors [1, 0, 1]: 50 %, not more
    _epoch1_with(run, combined_label=[0, 0, 1, 0, 2, 2])  # both distractors now labelled "zero"
    assert summarize_run(run).absorptions == []  # 2 distractors < warn_min_samples 10
    assert not format_summary(summarize_run(run)).startswith("WARNING")


def test_warning_when_one_class_absorbs_the_distractors(run):
    _epoch1_with(run, combined_label=[0, 0, 1, 0, 2, 2])  # u1 and u3 (natural) both as "zero"
    s = summarize_run(run, truth=ANY_COUNT)
    [a] = s.absorptions
    assert (a.manifest, CLASS_NAMES[a.class_index], a.count, a.total, a.basis) == ("epoch 1", "zero", 2, 2,
                                                                                    "distractors")
    lines = warning_lines(s)
    assert lines[0].startswith("WARNING: one class absorbs the distractors in 1 of 3 manifest(s)")
    assert "source != 'mnist'" in lines[0]
    assert "epoch 1 (final): class 'zero' (combined_label) holds 100.0% of the selected distractors (2 of 2)" in lines[1]
    text = format_summary(s)
    assert text.startswith(lines[0])  # at the very top of summary.txt
    assert s.to_dict()["warnings"][0]["share"] == 1.0


def test_the_share_threshold_is_a_setting(run):
    frame = url_list_frame()
    frame.loc[4, ["source", "demo_label"]] = ["natural", -1]  # u4 too: epoch 1's distractors are u1 (0), u3 u4 (2)
    write_url_list(run, frame)
    assert summarize_run(run).manifests[2].truth.distractors_per_class.tolist() == [1, 0, 2]
    at_least_3 = TruthSettings(warn_min_samples=3)  # select and epoch 0 select u4 alone: 1 of 1
    [a] = summarize_run(run, truth=at_least_3).absorptions
    assert (a.manifest, CLASS_NAMES[a.class_index], a.count, a.total) == ("epoch 1", "two", 2, 3)
    assert summarize_run(run, truth=TruthSettings(warn_min_samples=3, warn_share=0.7)).absorptions == []
    assert len(summarize_run(run, truth=ANY_COUNT).absorptions) == 3


def test_without_ground_truth_the_selection_share_warns(tmp_path):
    run = build_run(tmp_path)  # no URL list
    s = summarize_run(run, truth=ANY_COUNT)
    assert s.truth is None and all(m.truth is None for m in s.manifests)
    assert s.absorptions == []  # epoch 1 selects [2, 0, 2]: a tie
    assert "url_list.parquet" in s.truth_note and "skipped" in s.truth_note
    assert "Ground truth per manifest" not in format_summary(s)
    assert format_summary(s).splitlines()[-1] == s.truth_note  # one line, at the end
    _epoch1_with(run, combined_label=[0, 0, 1, 0, 0, 2])  # selected u0 u1 u3 u4 all "zero"
    s = summarize_run(run, truth=ANY_COUNT)
    [a] = s.absorptions
    assert (a.manifest, a.class_index, a.count, a.total, a.basis) == ("epoch 1", 0, 4, 4, "selection")
    assert warning_lines(s)[0].startswith("WARNING: one class holds more than 50.0% of the selection in 1 of 3")
    assert summarize_run(run).absorptions == []  # 4 selected < 10


def test_url_list_without_the_column_says_so_in_one_line(run):
    write_url_list(run, url_list_frame().drop(columns=["source", "demo_label"]))
    s = summarize_run(run)
    assert s.truth is None and not s.has_truth
    assert "has no 'source' column" in s.truth_note and "\n" not in s.truth_note
    assert "inspect.ground_truth_column" in s.truth_note
    assert [t.title for t in tables(s)].count("Ground truth per manifest") == 0
    d = s.to_dict()
    assert d["ground_truth"] == {"available": False, "note": s.truth_note}
    assert all(m["ground_truth"] is None for m in d["manifests"])


def test_switched_off_ground_truth_is_silent(run):
    s = summarize_run(run, truth=TruthSettings(column=None))
    assert s.truth is None and s.truth_note is None and not s.has_truth


def test_without_a_true_label_column_purity_stays_and_class_recall_goes(run):
    write_url_list(run, url_list_frame().drop(columns=["demo_label"]))
    s = summarize_run(run)
    e1 = s.manifests[2].truth
    assert e1.purity == pytest.approx(0.5) and e1.class_recall is None
    assert "no 'demo_label' column" in s.truth_note
    titles = [t.title for t in tables(s)]
    assert "Ground truth per manifest" in titles and "In-domain recall per true class" not in titles


def test_columns_and_value_are_settings_and_labels_may_be_class_names(run):
    frame = url_list_frame().rename(columns={"source": "origin", "demo_label": "truth"})
    frame["origin"] = frame["origin"].map({"mnist": "digits", "natural": "web", "broken": "web"})
    frame["truth"] = [CLASS_NAMES[k] if k >= 0 else None for k in frame["truth"]]
    write_url_list(run, frame)
    settings = TruthSettings(column="origin", in_domain_value="digits", label_column="truth")
    e1 = summarize_run(run, truth=settings).manifests[2].truth
    assert e1.purity == pytest.approx(0.5) and e1.recall == pytest.approx(0.5)
    np.testing.assert_allclose(e1.class_recall, [1.0, 0.0, 1.0])
    # the demo's column names find nothing here
    assert summarize_run(run).truth is None


def test_manifest_rows_missing_from_the_url_list_are_left_out_and_counted(run):
    write_url_list(run, url_list_frame()[lambda f: f["uid"] != UIDS[1]])  # u1 (a selected distractor in epoch 1)
    s = summarize_run(run)
    e1 = s.manifests[2]
    assert (e1.truth.known, e1.truth.selected_known, e1.truth.distractors) == (5, 3, 1)
    assert e1.truth.purity == pytest.approx(2 / 3)
    gt = next(t for t in tables(s) if t.title == "Ground truth per manifest")
    assert gt.header[-1] == "no truth" and gt.rows[-1][-1] == "1"


def test_lookup_of_the_ground_truth(run):
    truth, note = load_ground_truth(run, class_names=CLASS_NAMES)
    assert note is None and truth.num_classes == 3 and (truth.urls, truth.in_domain_urls) == (8, 5)
    found, in_domain, true = truth.lookup(uid_hashes(pa.array([UIDS[0], UIDS[1], "nowhere", "u7" + "0" * 30])))
    assert found.tolist() == [True, True, False, True]
    assert in_domain.tolist() == [True, False, False, True]
    assert true.tolist() == [0, -1, -1, 0]
