"""benchmarks/perf.py runs end to end at tiny size (it measures nothing useful there; no timing asserted)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import DEMO_CONFIG, REPO

pytestmark = pytest.mark.slow


def test_perf_benchmark_runs_every_measure_on_the_toy_run(toy_run, tmp_path):
    run_dir, overrides = toy_run
    work = tmp_path / "perf"
    (work / "base").parent.mkdir(parents=True)
    (work / "base").symlink_to(run_dir)  # demo-data, download and score are complete there
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "perf.py"), "--quick", "--run-dir", str(work),
                           "--config", str(DEMO_CONFIG), *overrides], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in table[:7]] == ["1", "1b", "2", "3", "4", "5", "6"]
    assert all(line.rstrip(" |").endswith(("met", "MISSED")) for line in table[:7])


def test_guard_overhead_benchmark_fetches_the_toy_pool_both_ways(toy_run):
    run_dir, _ = toy_run
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "guard_overhead.py"), "--run-dir", str(run_dir),
                           "--profile", "--top", "3"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    urls = json.loads((run_dir / "download" / "meta.json").read_text())["counts"]["urls"]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{urls} loopback URLs, 16 threads: direct ") and " ratio " in last
    assert "function calls" in done.stdout  # the handlers' profile was printed
