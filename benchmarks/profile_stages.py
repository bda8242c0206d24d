"""Where each compute stage spends its time: cProfile of the score pass, the per-epoch pool pass and
one KD³ epoch on a base run, one torch thread, the top functions by own time.

Usage: python benchmarks/profile_stages.py [--run-dir runs/perf/base] [--top 12]
(``benchmarks/perf.py`` makes the base run: demo-data, download, score of pipelines/demo.yaml.)
The readings before and after each optimisation are in BENCHMARKS.md (performance section).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from kd3 import layout
from kd3.config import load_config, resolve_path
from kd3.data.shards import list_shards
from kd3.models import load_model
from kd3.stages.score import teacher_pass
from kd3.training.build import build_trainer

ROOT = Path(__file__).resolve().parents[1]


def profile(name: str, fn, top: int) -> None:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(fn)
    seconds = time.perf_counter() - start
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start_row = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    print(f"\n== {name}: {seconds:.2f} s (under cProfile) — top {top} by own time")
    for line in lines[start_row:start_row + top + 1]:
        print(line.replace(str(ROOT) + "/", "").replace(torch.__path__[0].rsplit("/", 1)[0] + "/", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "perf" / "base")
    parser.add_argument("--config", type=Path, default=ROOT / "pipelines" / "demo.yaml")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    cfg = load_config(args.config, ["run.num_threads=1", "averaging.modes=[]"])
    base = args.run_dir
    teacher, meta, _ = load_model(resolve_path(cfg.score.teacher, base), device)
    shards = list_shards(base / layout.DOWNLOAD)

    def score() -> None:  # what the score stage does per shard, caches included
        for shard in shards:
            teacher_pass(teacher, meta, shard, cfg.score.batch_size, 0, device, cfg.score.bn_distance,
                         cfg.score.bn_variance_weight, [], [])

    trainer = build_trainer(cfg, base, device, None)[0]
    profile("score: teacher pass over the shards (decoding included)", score, args.top)
    profile("train: KD³ pool pass + selection (pixel cache)",
            lambda: trainer.source.epoch(0, trainer.epochs, trainer.student, trainer.meta.input), args.top)
    profile("train: one KD³ epoch (pool pass, batches, steps)", lambda: trainer._epoch(0), args.top)


if __name__ == "__main__":
    main()
