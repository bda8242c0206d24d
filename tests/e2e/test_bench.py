"""`kd3 bench --quick`: the benchmark harness end to end at toy scale (2 methods, 1 seed, tiny pool)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd3.cli import main

pytestmark = pytest.mark.slow
SPEC = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.yaml"


def test_quick_benchmark_writes_tables_plots_and_reuses_finished_cells(tmp_path, capsys):
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# kd3 benchmarks\n\n## Performance\nkept as it is\n")
    args = ["bench", "--config", str(SPEC), "--quick", "--runs-dir", str(tmp_path / "runs"),
            "--output", str(output), "--plots-dir", str(tmp_path / "plots")]
    assert main(args) == 0
    text = output.read_text()
    assert "kept as it is" in text and "kd3 bench" in text
    assert "| kd-all |" in text and "| **kd3-kl0.3** (default) |" in text
    assert (tmp_path / "plots" / "quality_demo_quick.png").stat().st_size > 1000
    cell = json.loads((tmp_path / "runs" / "demo" / "bench" / "kd-all-s0.json").read_text())
    assert set(cell["last"]) == {"private_test", "mnist_shifted"}
    assert len(cell["private_top1_per_epoch"]) == 2 and len(cell["selection"]) == 2
    # the whole pool is selected: purity is the pool's in-domain share (90 MNIST of 120 decodable)
    assert cell["selection"][0]["purity"] == pytest.approx(0.75, abs=0.05)
    capsys.readouterr()
    assert main(args) == 0  # a second run reuses every cell: nothing is trained again
    assert "seed 0: private top-1" not in capsys.readouterr().out
    assert output.read_text().count("kd3 bench: quality begin") == 1
