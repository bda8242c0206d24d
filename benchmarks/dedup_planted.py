"""Planted-copy measurement of ``kd3 dedup`` at demo scale (a printed measurement, not a test).

Copies a finished run's ``demo-data`` (teacher, evaluation sets, web pool), plants light edits
(kd3.bench.planted.EDITS: identical copy, resize ±10 %, JPEG q85, +10 grey levels, 1-px shift) of
``--pool-copies`` pool images and of ``--eval-copies`` images of each evaluation set into the web
pool, downloads and scores it, runs ``kd3 dedup`` at each ``--thresholds`` value of ``--sweep``
(default ``dedup.verify_similarity``) and prints recall (planted copies removed with the right match)
and precision (removed samples that were planted). ``--repeated N`` instead crawls N URLs behind
``--distinct`` files (query strings differ) and prints how many samples dedup keeps.

    .venv/bin/python benchmarks/dedup_planted.py --source-run runs/demo --out runs/dedup-planted
    .venv/bin/python benchmarks/dedup_planted.py --source-run runs/demo --out runs/dedup-repeated --repeated 3000 --distinct 40
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from kd3 import layout
from kd3.bench.planted import plant, repeated_urls, score_planted
from kd3.cli import main

REPO = Path(__file__).resolve().parents[1]


def _stage(stage: str, config: str, run: Path, urls: Path, *extra: str, mode: str = "--resume") -> None:
    code = main([stage, "--config", config, "--run-dir", str(run), mode, "-q", f"download.url_list={urls}",
                 f"demo_data.url_list={urls}", *extra])
    if code != 0:
        raise SystemExit(f"kd3 {stage} failed (exit {code})")


def main_(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-run", type=Path, required=True, help="a run folder with a finished demo-data stage")
    ap.add_argument("--out", type=Path, required=True, help="new run folder (its demo-data is copied in)")
    ap.add_argument("--config", default=str(REPO / "pipelines" / "demo.yaml"))
    ap.add_argument("--pool-copies", type=int, default=120)
    ap.add_argument("--eval-copies", type=int, default=60, help="per evaluation set")
    ap.add_argument("--sweep", default="dedup.verify_similarity", help="the config key --thresholds sets")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.98, 0.985, 0.99])
    ap.add_argument("--repeated", type=int, default=0, help="crawl this many URLs behind --distinct files instead")
    ap.add_argument("--distinct", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides for every stage, e.g. dedup.max_shift=1")
    args = ap.parse_args(argv)
    out = args.out
    if not (out / layout.DEMO_DATA).is_dir():
        shutil.copytree(args.source_run / layout.DEMO_DATA, out / layout.DEMO_DATA)
    web = out / layout.DEMO_DATA / "web"
    urls = pd.read_parquet(args.source_run / layout.DOWNLOAD / layout.URL_LIST).drop(columns=["uid"])
    rng = np.random.default_rng(args.seed)
    images = np.flatnonzero(urls["source"].isin(["mnist", "natural"]).to_numpy())
    url_list = out / "urls.parquet"
    if args.repeated:
        table = repeated_urls(web, urls, sorted(rng.choice(images, args.distinct, replace=False)), args.repeated)
    else:
        evals = {"private_test": web.parent / "private_test.npz", "mnist_shifted": web.parent / "mnist_shifted_test.npz"}
        planted = plant(web, urls, sorted(rng.choice(images, args.pool_copies, replace=False)), evals,
                        args.eval_copies, args.seed)
        table = pd.concat([urls, planted], ignore_index=True)
    table.to_parquet(url_list, index=False)
    for stage in ("download", "score"):
        _stage(stage, args.config, out, url_list, *args.overrides)
    results = []
    downloaded = pd.read_parquet(out / layout.DOWNLOAD / layout.URL_LIST)
    for t in args.thresholds:
        _stage("dedup", args.config, out, url_list, *args.overrides, f"{args.sweep}={t}",
               mode="--overwrite")
        removed = pd.read_parquet(layout.dedup_removed(out))
        meta = json.loads((out / layout.DEDUP / "meta.json").read_text())["counts"]
        if args.repeated:
            result = {args.sweep: t, "urls": args.repeated, "distinct_files": args.distinct, "pool": meta["pool"],
                      "distinct_pixels": meta["distinct_pixels"], "kept": meta["kept"],
                      "removed_by_reason": meta["removed_by_reason"]}
        else:
            result = {args.sweep: t, **score_planted(removed, downloaded)}
        result["dedup_seconds"] = meta.get("seconds")
        results.append(result)
        print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
