"""`kd3 inspect` as a stage on a hand-built run: files, links, resume policy, and a real browser.

The run (6 samples, 3 classes, 2 KD³ epochs) is built in tmp_path by the unit tests' builders;
no other stage runs. The browser test needs Debian's chromium and is skipped without it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from kd3.cli import main
from kd3.inspect.report import check_links, page_links

from tests.unit.test_inspect_fixtures import build_run

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "pipelines" / "demo.yaml")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SMALL = ["inspect.top_n=4", "inspect.bottom_n=2", "inspect.rejected_n=2", "inspect.thumbnail_size=32"]


def _inspect(run: Path, *extra: str) -> int:
    return main(["inspect", "--config", CONFIG, "--run-dir", str(run), *SMALL, *extra])


@pytest.fixture
def report(tmp_path, capsys):
    run = build_run(tmp_path)
    assert _inspect(run) == 0
    return run / "inspect" / "index.html", capsys.readouterr().out


def test_report_links_every_plot_and_sheet_and_they_exist(report):
    index, _ = report
    links = page_links(index.read_text())
    local = {link for link in links if not link.startswith("#")}
    expected = {"plots/selection_per_class.png", "plots/thresholds.png", "plots/training.png",
                "plots/confidence.png", "sheets/class_000.png", "sheets/class_001.png", "sheets/class_002.png",
                "summary.json", "summary.txt", "meta.json"}
    assert expected <= local
    assert check_links(index) == []  # every link relative, every file present
    assert not any(link.startswith(("http:", "https:", "//", "/")) for link in links)
    page = index.read_text()
    assert "<script" not in page.lower()
    assert "http://example.invalid/4.png" in page  # sample URLs as text, never as links


def test_stage_writes_meta_summary_and_ends_with_the_index_path(report):
    index, out = report
    run_dir = index.parent.parent
    meta = json.loads((index.parent / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["counts"]["sheets"] == 3 and meta["counts"]["tiles_missing"] == 0
    assert meta["config"]["inspect"]["top_n"] == 4
    assert set(meta["inputs"]) == {"score", "select", "train.selection", "download"}
    summary = json.loads((index.parent / "summary.json").read_text())
    assert [m["name"] for m in summary["manifests"]] == ["select", "epoch 0", "epoch 1"]
    # the very last line printed is the page, for scripts and copy-paste
    assert out.splitlines()[-1] == str(index.resolve())
    assert (run_dir / "inspect" / "summary.txt").read_text().startswith("Pool")


def test_rerun_follows_the_folder_policy(report, capsys):
    index, _ = report
    run = index.parent.parent
    assert _inspect(run) == 2
    assert "--resume" in capsys.readouterr().err
    assert _inspect(run, "--resume") == 0
    out = capsys.readouterr().out
    assert "up to date" in out and out.splitlines()[-1] == str(index.resolve())
    # a new epoch manifest changes the inputs: resume refuses, overwrite rebuilds
    shutil.copy(run / "train" / "selection" / "epoch_001.parquet", run / "train" / "selection" / "epoch_002.parquet")
    assert _inspect(run, "--resume") == 2
    assert "train.selection" in capsys.readouterr().err
    assert _inspect(run, "--overwrite") == 0


def test_select_manifest_alone_is_enough(tmp_path):
    run = build_run(tmp_path, epochs=False)
    assert _inspect(run) == 0
    index = run / "inspect" / "index.html"
    assert check_links(index) == []
    assert "thresholds.png" not in index.read_text()  # the select stage has no τ_k


def test_without_manifests_the_stage_says_what_to_run(tmp_path, capsys):
    run = build_run(tmp_path, epochs=False, select=False)
    assert _inspect(run) == 2
    assert "kd3 select" in capsys.readouterr().err
    assert not (run / "inspect").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium); "
                                             "the page is still checked for links by the other tests")
def test_page_renders_in_headless_chromium(report, tmp_path):
    index, _ = report
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,900", index.resolve().as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    with Image.open(shot) as img:
        assert img.size == (1200, 900)
        spread = ImageStat.Stat(img.convert("L")).stddev[0]
    assert spread > 10, "the screenshot is blank: the page did not render"
