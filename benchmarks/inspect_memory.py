"""Peak memory of the inspect summary on a large synthetic run (a printed measurement, not a test).

Builds ``--epochs`` KD³ selection manifests of ``--rows`` rows each (default 2 × 1M) in a temp
folder, laid out as the train stage writes them (pandas/pyarrow, one row group per million rows),
then summarises them in a fresh child process and prints that process's peak RSS, next to a child
that only imports the same modules (the baseline). Also times a class-filtered query.

    .venv/bin/python benchmarks/inspect_memory.py            # 1M rows × 2 epochs
    .venv/bin/python benchmarks/inspect_memory.py --rows 200000 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NUM_CLASSES = 100

# Linux keeps a parent's ru_maxrss across fork+exec, so children read their own high-water mark
# (VmHWM, per address space) and fall back to getrusage elsewhere.
PEAK = """
def peak_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource, sys
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
"""

SUMMARY_CHILD = PEAK + """
import json, sys, time
from pathlib import Path
from kd3.inspect.summary import format_summary, summarize_run
start = time.perf_counter()
summary = summarize_run(Path(sys.argv[1]))
text = format_summary(summary, max_classes=10)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb(),
                  "selected_last": summary.final.selected, "churn_in": summary.final.churn_in}))
"""
QUERY_CHILD = PEAK + """
import json, sys, time
from pathlib import Path
from kd3.inspect.manifests import pick_manifests
from kd3.inspect.query import RowFilter, filtered_batches, schema_of, write_rows
start = time.perf_counter()
ref = pick_manifests(Path(sys.argv[1]), "last")[0]
rows = write_rows(filtered_batches(ref, RowFilter(selected=True, classes=(3,), min_conf=0.5)), schema_of(ref),
                  Path(sys.argv[1]) / "q.parquet")
print(json.dumps({"seconds": time.perf_counter() - start, "rows": rows,
                  "peak_rss_mb": peak_mb()}))
"""
BASELINE_CHILD = PEAK + """
import json
import kd3.inspect.summary, kd3.inspect.query, pandas
print(json.dumps({"peak_rss_mb": peak_mb()}))
"""


def build_manifest(path: Path, rows: int, epoch: int, rng: np.random.Generator) -> None:
    """One epoch's manifest with the train stage's schema and plausible values."""
    uid = pa.array([f"{i:032x}" for i in range(rows)])  # stable across epochs, so churn is real
    labels = rng.integers(0, NUM_CLASSES, rows).astype(np.int16)
    conf = rng.beta(5, 2, rows).astype(np.float32)
    tau = rng.uniform(0.5, 0.9, NUM_CLASSES).astype(np.float32)
    selected = conf >= tau[labels]
    weight = np.where(selected, rng.uniform(0, 1, rows), np.nan).astype(np.float32)
    table = pa.table({
        "uid": uid, "url": pa.array([f"https://example.invalid/img/{i}.jpg" for i in range(rows)]),
        "shard": pa.array([f"{i // 10_000:05d}" for i in range(rows)]),
        "key": pa.array([f"{i:09d}" for i in range(rows)]),
        "epoch": np.full(rows, epoch, np.int64), "selected": selected,
        "teacher_label": labels, "teacher_conf": conf, "student_label": labels, "student_conf": conf,
        "combined_label": labels, "combined_conf": conf, "class_threshold": tau[labels],
        "alpha": np.full(rows, 0.5, np.float32), "weight": weight,
    })
    pq.write_table(table, path)


def _self_peak_mb() -> float:
    scope: dict = {}
    exec(PEAK, scope)
    return scope["peak_mb"]()


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kd3-inspect-bench-") as tmp:
        run = Path(tmp) / "run"
        (run / "train" / "selection").mkdir(parents=True)
        (run / "score").mkdir()
        (run / "score" / "meta.json").write_text(json.dumps(
            {"status": "complete", "teacher": {"class_names": [f"c{k}" for k in range(NUM_CLASSES)]}}))
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for epoch in range(args.epochs):
            build_manifest(run / "train" / "selection" / f"epoch_{epoch:03d}.parquet", args.rows, epoch, rng)
        size_mb = sum(p.stat().st_size for p in (run / "train" / "selection").glob("*.parquet")) / 2**20
        print(f"built {args.epochs} manifest(s) × {args.rows:,} rows ({size_mb:.0f} MB parquet) "
              f"in {time.perf_counter() - start:.1f}s")
        base = child(BASELINE_CHILD)
        summary = child(SUMMARY_CHILD, str(run))
        query = child(QUERY_CHILD, str(run))
    print(f"baseline (imports only):      peak RSS {base['peak_rss_mb']:7.0f} MB")
    print(f"summary of every manifest:    peak RSS {summary['peak_rss_mb']:7.0f} MB "
          f"(+{summary['peak_rss_mb'] - base['peak_rss_mb']:.0f} MB over baseline), {summary['seconds']:.1f}s; "
          f"last epoch selected {summary['selected_last']:,}, entered {summary['churn_in'] or 0:,}")
    print(f"query (class 3, conf ≥ 0.5):  peak RSS {query['peak_rss_mb']:7.0f} MB, {query['seconds']:.1f}s, "
          f"{query['rows']:,} rows")
    print(f"(this process, which built the manifests: peak RSS {_self_peak_mb():.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
