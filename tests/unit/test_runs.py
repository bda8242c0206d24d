"""Run-folder policy: refuse non-empty folders, overwrite, resume, and atomic writes."""

import json

import pytest

from kd3.errors import RunFolderError
from kd3.runs import atomic_path, atomic_write_json, open_stage, read_jsonl, append_jsonl


def open_(tmp_path, mode=None, config=None, fingerprint="a", inputs=None):
    return open_stage(tmp_path, "score", config or {"score": {"x": 1}}, fingerprint, inputs or {"download": "d1"}, mode)


def test_fresh_stage_writes_meta_and_finish_marks_complete(tmp_path):
    out = open_(tmp_path)
    meta = json.loads((tmp_path / "score" / "meta.json").read_text())
    assert meta["status"] == "running" and meta["config"] == {"score": {"x": 1}} and "torch" in meta["versions"]
    out.finish({"scored": 3})
    meta = json.loads((tmp_path / "score" / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["counts"] == {"scored": 3} and "finished_at" in meta


def test_non_empty_folder_is_refused_without_a_mode(tmp_path):
    open_(tmp_path).finish({})
    with pytest.raises(RunFolderError, match="not empty .*--resume.*--overwrite"):
        open_(tmp_path)


def test_resume_of_finished_stage_is_up_to_date(tmp_path):
    open_(tmp_path).finish({"n": 1})
    again = open_(tmp_path, mode="resume")
    assert again.up_to_date and not again.resumed


def test_resume_of_unfinished_stage_continues(tmp_path):
    open_(tmp_path)  # interrupted: status stays "running"
    (tmp_path / "score" / "part.parquet").write_text("partial")
    again = open_(tmp_path, mode="resume")
    assert again.resumed and not again.up_to_date
    assert (tmp_path / "score" / "part.parquet").exists()
    assert json.loads((tmp_path / "score" / "meta.json").read_text())["resume_count"] == 1


def test_resume_refuses_changed_config_naming_the_key(tmp_path):
    open_(tmp_path).finish({})
    with pytest.raises(RunFolderError, match=r"config changed .*score\.x"):
        open_(tmp_path, mode="resume", config={"score": {"x": 2}}, fingerprint="b")


def test_resume_refuses_changed_inputs(tmp_path):
    open_(tmp_path).finish({})
    with pytest.raises(RunFolderError, match="inputs changed .*download"):
        open_(tmp_path, mode="resume", inputs={"download": "d2"})


def test_resume_refuses_foreign_folder(tmp_path):
    (tmp_path / "score").mkdir()
    (tmp_path / "score" / "something.txt").write_text("x")
    with pytest.raises(RunFolderError, match="no meta.json"):
        open_(tmp_path, mode="resume")


def test_overwrite_starts_over(tmp_path):
    open_(tmp_path).finish({})
    (tmp_path / "score" / "old.txt").write_text("x")
    out = open_(tmp_path, mode="overwrite")
    assert not (tmp_path / "score" / "old.txt").exists() and not out.up_to_date


def test_atomic_path_keeps_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "data.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_jsonl_reader_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"epoch": 0})
    with open(path, "a") as fh:
        fh.write('{"epoch": 1, "lo')
    assert read_jsonl(path) == [{"epoch": 0}]
