"""`kd3 inspect` as a stage on a hand-built run: files, links, resume policy, and a real browser.

The run (6 samples, 3 classes, 2 KD³ epochs) is built in tmp_path by the unit tests' builders;
no other stage runs. The browser test needs Debian's chromium: it is skipped without it, except
where KD3_REQUIRE_BROWSER is set (``.ci/run`` installs chromium and sets it), where it fails.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from kd3.cli import main
from kd3.inspect.report import check_links, page_links
from tests.unit.test_inspect_fixtures import build_run, epoch_frame, url_list_frame, write_url_list

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
    assert 'class="warning"' not in page and "purity.png" not in page  # no URL list: no ground truth, no warning


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


def test_ground_truth_tables_plot_and_a_planted_warning(tmp_path, capsys):
    run = build_run(tmp_path, url_list=True)
    planted = epoch_frame(1)
    planted["combined_label"] = planted["combined_label"].where(planted["uid"] != planted["uid"][3], 0)  # u3 → "zero"
    planted.to_parquet(run / "train" / "selection" / "epoch_001.parquet", index=False)
    assert _inspect(run, "inspect.warn_min_samples=2") == 0
    out = capsys.readouterr().out
    index = run / "inspect" / "index.html"
    page = index.read_text()
    # the warning: first in summary.txt, atop the page (before any table), and printed again after the tables
    text = (run / "inspect" / "summary.txt").read_text()
    assert text.startswith("WARNING: one class absorbs the distractors in 1 of 3 manifest(s)")
    assert "epoch 1 (final): class 'zero' (combined_label) holds 100.0% of the selected distractors (2 of 2)" in text
    assert page.index('class="warning"') < page.index("<section")
    assert "[inspect] WARNING: one class absorbs the distractors" in out
    assert out.index("[inspect] WARNING") > out.index("Confidence histogram")
    assert out.splitlines()[-1] == str(index.resolve())
    # the tables, the plot, the numbers
    assert "Ground truth per manifest" in page and "In-domain recall per true class" in page
    assert "plots/purity.png" in page_links(page) and check_links(index) == []
    summary = json.loads((run / "inspect" / "summary.json").read_text())
    e1 = summary["manifests"][2]["ground_truth"]
    assert (e1["purity"], e1["in_domain_recall"], e1["distractors_per_class"]) == (0.5, 0.5, {"zero": 2, "one": 0,
                                                                                              "two": 0})
    assert summary["warnings"][0]["class"] == "zero" and summary["warnings"][0]["basis"] == "distractors"
    meta = json.loads((run / "inspect" / "meta.json").read_text())
    assert "ground_truth" in meta["inputs"] and meta["counts"]["warnings"] == 1
    # a changed URL list is a changed input
    write_url_list(run, url_list_frame().assign(source="natural"))
    assert _inspect(run, "inspect.warn_min_samples=2", "--resume") == 2
    assert "ground_truth" in capsys.readouterr().err


def test_banner_warns_of_a_class_holding_the_confident_samples_and_of_a_selection_keeping_the_pool(tmp_path, capsys):
    run = build_run(tmp_path)
    metrics = run / "train" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[1]["confident_per_class"] = {"zero": 1, "one": 0, "two": 3}  # class 'two': 75% of the confident
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _inspect(run, "inspect.warn_min_samples=2", "inspect.warn_keep_share=0.6") == 0  # epoch 1 keeps 4 of 6
    out = capsys.readouterr().out
    page = (run / "inspect" / "index.html").read_text()
    confident = ("WARNING: one class holds more than 50.0% of the confident samples in 1 of 2 epoch(s); last epoch 1: "
                 "class 'two', 3 of 4")
    keeps = "WARNING: the final selection (epoch 1) keeps 66.7% of the pool (4 of 6)"
    for text in (confident, keeps):
        assert html.escape(text) in page and text in out and text in (run / "inspect" / "summary.txt").read_text()
    banner = page[page.index('<div class="warning"'):page.index("</div>", page.index('<div class="warning"'))]
    assert banner.count("<p><b>WARNING") == 2 and page.index('class="warning"') < page.index("<section")
    summary = json.loads((run / "inspect" / "summary.json").read_text())
    assert len(summary["selection_warnings"]) == 2 and summary["warnings"] == []  # no class absorbs the selection
    # at the defaults (10 samples at least, 95 % of the pool) this toy run is not warned about
    assert _inspect(run, "--overwrite") == 0
    assert 'class="warning"' not in (run / "inspect" / "index.html").read_text()


def test_url_list_without_ground_truth_is_one_line_and_no_tables(tmp_path, capsys):
    run = build_run(tmp_path, url_list=True)
    write_url_list(run, url_list_frame()[["url", "uid"]])  # a crawl of one's own: no source, no demo_label
    assert _inspect(run) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "ground truth" in line]
    assert len(said) == 1 and "has no 'source' column" in said[0] and "skipped" in said[0]
    page = (run / "inspect" / "index.html").read_text()
    assert "has no &#x27;source&#x27; column" in page
    assert "Ground truth per manifest" not in page and "purity.png" not in page and 'class="warning"' not in page
    summary = json.loads((run / "inspect" / "summary.json").read_text())
    assert summary["ground_truth"]["available"] is False and summary["warnings"] == []


#: appended to a copy of the page: on load, record how many images there are and which did not load
_IMAGE_PROBE = """<script>window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken", broken.join(" "));
});</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if os.environ.get("KD3_REQUIRE_BROWSER"):
            pytest.fail("KD3_REQUIRE_BROWSER is set but chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium); the page is still checked for links "
                    "by the other tests")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _loaded_images(index: Path, tmp_path: Path) -> tuple[int, list[str]]:
    """(images on the page, the src of each that did not load) as headless chromium sees them."""
    probe = index.parent / "_probe.html"  # beside index.html, so the relative links resolve the same
    probe.write_text(index.read_text().replace("</body>", _IMAGE_PROBE + "</body>"))
    try:
        result = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri())
    finally:
        probe.unlink()
    body = re.search(r'<body data-images="(\d+)" data-broken="([^"]*)"', result.stdout)
    assert body, f"the probe did not run (exit {result.returncode}): {result.stderr[-2000:]}"
    return int(body.group(1)), body.group(2).split()


def test_page_renders_in_headless_chromium(report, tmp_path):
    index, _ = report
    shot = tmp_path / "shot.png"
    result = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,900", index.resolve().as_uri())
    assert shot.is_file(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    with Image.open(shot) as img:
        assert img.size == (1200, 900)
        spread = ImageStat.Stat(img.convert("L")).stddev[0]
    assert spread > 10, "the screenshot is blank: the page did not render"
    # every plot and contact sheet on the page loads in the browser
    expected = index.read_text().count("<img ")
    assert expected == 7  # 4 plots + 3 class sheets
    assert _loaded_images(index, tmp_path) == (expected, [])
    # the probe can fail: a sheet gone from disk is reported as not loaded
    (index.parent / "sheets" / "class_001.png").unlink()
    assert _loaded_images(index, tmp_path) == (expected, ["sheets/class_001.png"])
