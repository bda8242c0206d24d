"""`kd3 query` and `kd3 export`: filters, CSV/parquet output, resharding round trip, overwrite policy."""

from __future__ import annotations

import json
import tarfile

import pandas as pd
import pytest

from kd3.cli import main
from kd3.errors import Kd3Error
from kd3.inspect.export import export_selection
from kd3.inspect.manifests import pick_manifests
from kd3.inspect.query import RowFilter, resolve_classes

from tests.unit.test_inspect_fixtures import CLASS_NAMES, UIDS, build_run, write_shards


@pytest.fixture
def run(tmp_path):
    return build_run(tmp_path)


def _tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_query_filters_to_csv_and_parquet(run, tmp_path, capsys):
    out = tmp_path / "q.csv"
    assert main(["query", "--run-dir", str(run), "--epoch", "1", "--class", "two", "--min-conf", "0.95",
                 "--selected", "--output", str(out)]) == 0
    frame = pd.read_csv(out)
    assert sorted(frame["uid"]) == [UIDS[3], UIDS[4]]
    assert "combined_conf" in frame.columns and "url" in frame.columns
    out_pq = tmp_path / "q.parquet"
    assert main(["query", "--run-dir", str(run), "--epoch", "all", "--class", "0", "--rejected",
                 "--columns", "uid,epoch,combined_conf", "--output", str(out_pq)]) == 0
    frame = pd.read_parquet(out_pq)
    assert list(frame.columns) == ["uid", "epoch", "combined_conf"]
    assert frame[["uid", "epoch"]].values.tolist() == [[UIDS[1], 0]]  # u1: rejected in epoch 0 only
    assert main(["query", "--run-dir", str(run), "--output", str(out)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_query_prints_rows_and_summary(run, capsys):
    assert main(["query", "--run-dir", str(run), "--selected", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 row(s) match" in out and "showing 2" in out
    assert main(["query", "--run-dir", str(run), "--summary"]) == 0
    assert "Class thresholds" in capsys.readouterr().out


def test_class_values_resolve_by_name_then_index():
    assert resolve_classes(["two", "0,1"], CLASS_NAMES) == (2, 0, 1)
    with pytest.raises(Kd3Error, match="--class 'three'"):
        resolve_classes(["three"], CLASS_NAMES)
    with pytest.raises(Kd3Error, match="outside 0..2"):
        resolve_classes(["5"], CLASS_NAMES)


def test_export_round_trip_keeps_exactly_the_filtered_uids_and_their_bytes(run, tmp_path):
    images = write_shards(tmp_path / "copy")  # the same bytes the run's shards hold
    out = tmp_path / "export"
    ref = pick_manifests(run, "1")[0]
    counts = export_selection(ref, RowFilter(selected=True, classes=(0, 2)), run / "download" / "shards", out,
                              maxcount=3, class_names=CLASS_NAMES)
    assert counts == {"expected": 4, "written": 4, "missing": 0, "shards": 2}
    members = {}
    for tar in sorted(out.glob("*.tar")):
        members.update(_tar_members(tar))
    keys = sorted({name.split(".")[0] for name in members})
    assert keys == sorted([UIDS[0], UIDS[1], UIDS[3], UIDS[4]])
    for uid in keys:
        assert members[f"{uid}.png"] == images[uid]  # original bytes, unchanged
        record = json.loads(members[f"{uid}.json"])
        assert record["uid"] == uid and record["url"].startswith("http://example.invalid/")
        assert record["class"] == CLASS_NAMES[record["label"]] and record["download"]["uid"] == uid
        assert members[f"{uid}.cls"] == str(record["label"]).encode()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"] == "export" and meta["status"] == "complete" and meta["reconciled"] is True
    assert meta["counts"]["expected"] == meta["counts"]["written"] == 4
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 1}
    assert pd.read_parquet(out / "manifest.parquet")["exported"].all()
    assert not (out / ".partial").exists()


def test_export_refuses_non_empty_output_unless_overwrite_and_only_its_own(run, tmp_path):
    ref = pick_manifests(run, "1")[0]
    shards = run / "download" / "shards"
    out = tmp_path / "export"
    export_selection(ref, RowFilter(selected=True), shards, out)
    with pytest.raises(Kd3Error, match="not empty; pass --overwrite"):
        export_selection(ref, RowFilter(selected=True), shards, out)
    assert export_selection(ref, RowFilter(selected=False), shards, out, overwrite=True)["written"] == 2
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(Kd3Error, match="no meta.json from `kd3 export`"):
        export_selection(ref, RowFilter(), shards, stranger, overwrite=True)
    assert (stranger / "notes.txt").exists()


def test_export_reports_samples_missing_from_the_shards(run, tmp_path, capsys):
    (run / "download" / "shards" / "00001.tar").unlink()
    out = tmp_path / "export"
    assert main(["export", "--run-dir", str(run), "--output", str(out)]) == 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"] == {"expected": 4, "written": 2, "missing": 2, "shards": 1}
    assert meta["status"] == "incomplete" and meta["reconciled"] is False
    assert (out / "missing_uids.txt").read_text().split() == [UIDS[3], UIDS[4]]
    assert "not found" in capsys.readouterr().out


def test_export_with_nothing_to_write_fails_before_touching_the_output(run, tmp_path):
    out = tmp_path / "export"
    with pytest.raises(Kd3Error, match="no sample passes the filter"):
        export_selection(pick_manifests(run, "1")[0], RowFilter(min_conf=0.999), run / "download" / "shards", out)
    assert not out.exists()


@pytest.mark.parametrize("uid", ["../../../../x", "has.dot", "a/b"])
def test_export_refuses_a_uid_that_is_not_a_plain_key_before_writing(run, tmp_path, uid):
    """issue 15: a uid from the URL list must never become a tar member name with a path in it."""
    ref = pick_manifests(run, "1")[0]
    frame = pd.read_parquet(ref.path)
    frame.loc[0, "uid"] = uid
    frame.to_parquet(ref.path, index=False)
    out = tmp_path / "export"
    with pytest.raises(Kd3Error, match="is not a plain sample key"):
        export_selection(pick_manifests(run, "1")[0], RowFilter(), run / "download" / "shards", out)
    assert not out.exists()
