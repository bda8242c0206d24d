"""Every stage against its physical limit: the ratios of issue 12, measured in one run.

Prints one table (measure, value, ratio, target) and, with ``--write``, puts it into BENCHMARKS.md
between the ``kd3 bench: perf`` markers, with the machine described. Nothing here is asserted in
tests (tests/e2e/test_perf_bench.py only runs it at tiny size).

  1  score stage images/s from shards ÷ the same teacher's forward on the same images in memory
  2  per-epoch pool pass + selection (cached teacher outputs) ÷ teacher + student forward over the
     pool in memory (the reference a pipeline without a score cache would pay)
  3  KD³ training step ÷ plain KD step (same models, same batch)
  4  one KD³ epoch end to end (pool pass, loading included) ÷ the sum of its pure compute steps
  5  peak RSS of the score, select and train stages at ``--scale``× the pool ÷ at 1× (synthetic shards)
  6  download stage ÷ bare img2dataset on the same loopback URL list
  7  score and select time at each of ``--sizes`` (synthetic shards made by re-keying the demo's)

Usage: python benchmarks/perf.py [--run-dir runs/perf] [--sizes 1000,10000,100000] [--scale 10]
       [--quick] [--write] [--config pipelines/demo.yaml] [key=value overrides for every stage]
The base run (demo-data, download, score of the config) is made under RUN/base when missing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import torch

from kd3 import layout
from kd3.config import load_config, resolve_path
from kd3.data.images import normalize
from kd3.data.shards import ShardImages, image_loader, iter_raw_samples, list_shards
from kd3.models import load_model
from kd3.models.registry import build_model
from kd3.models.spec import InputSpec, ModelMeta
from kd3.stages.score import teacher_pass
from kd3.training.build import build_trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pipelines" / "demo.yaml"
OVERRIDES: list[str] = []  # set from the command line: applied to every stage and config load
MARK_BEGIN, MARK_END = "<!-- kd3 bench: perf begin -->", "<!-- kd3 bench: perf end -->"
TARGETS = {1: (">=", 0.85), "1b": (">=", 0.85), 2: ("<=", 0.6), 3: ("<=", 2.2), 4: ("<=", 1.15), 5: ("<=", 1.3), 6: ("<=", 1.10)}


# ------------------------------------------------------------------------------------------ helpers
# A stage's peak RSS is read by a small launcher process, not by this one: on Linux a child's
# ru_maxrss starts from its parent's high-water mark at fork (it survives exec), so children of this
# process, which holds the pool's images and models, would all report at least its own peak.
_LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, s, u = os.wait4(p.pid, 0); "
             "print(f'perf-maxrss-kb {u.ru_maxrss}', flush=True); sys.exit(os.waitstatus_to_exitcode(s))")


def kd3_stage(stage: str, run_dir: Path, *overrides: str) -> tuple[float, float]:
    """Run ``kd3 <stage>`` in a child process; (wall seconds, peak RSS in MB) of that child alone."""
    cmd = [sys.executable, "-m", "kd3.cli", stage, "--config", str(CONFIG), "--run-dir", str(run_dir),
           "--overwrite", "run.num_threads=1", *OVERRIDES, *overrides]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise SystemExit(f"perf: `{' '.join(cmd)}` failed:\n{output[-3000:]}")
    return seconds, int(re.findall(r"perf-maxrss-kb (\d+)", output)[-1]) / 1024  # KiB on Linux


def ensure_base(run_dir: Path) -> None:
    """demo-data → download → score of the demo config, reused when already complete."""
    for stage in ("demo-data", "download", "score"):
        meta = run_dir / stage / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()).get("status") == "complete":
            continue
        print(f"perf: making the base run: kd3 {stage} …", flush=True)
        kd3_stage(stage, run_dir)


def timed(fn, repeats: int) -> float:
    """Mean seconds of ``fn`` over ``repeats`` runs after one warm-up; ``repeats=0``: one cold run."""
    if repeats == 0:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def uid_for(uid: str, copy: int) -> str:
    return hashlib.sha1(f"{uid}/{copy}".encode()).hexdigest()[:16]


def synthetic_download(base: Path, dest: Path, size: int, per_shard: int = 1000) -> Path:
    """A complete download stage of ``size`` samples: the base run's images re-keyed with fresh uids
    (same bytes, so decoding cost per image is the real one), written as img2dataset lays it out."""
    out = dest / layout.DOWNLOAD
    if (out / "meta.json").is_file():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    shards = out / "shards"
    shards.mkdir(parents=True)
    samples = list(iter_raw_samples(list_shards(base / layout.DOWNLOAD)))
    urls, n_shards = [], (size + per_shard - 1) // per_shard
    for s in range(n_shards):
        rows = []
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(min(per_shard, size - s * per_shard)):
                n = s * per_shard + i
                src = samples[n % len(samples)]
                uid, url, key = uid_for(src["uid"], n // len(samples)), f"{src['url']}#{n}", f"{s:05d}{i:04d}"
                for name, data in ((f"{key}.png", src["bytes"]), (f"{key}.json", json.dumps({"uid": uid, "url": url}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append({"uid": uid, "url": url, "key": key, "status": "success", "error_message": None})
        pd.DataFrame(rows).to_parquet(shards / f"{s:05d}.parquet", index=False)
        (shards / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
        urls += rows
    pd.DataFrame(urls)[["uid", "url"]].to_parquet(out / layout.URL_LIST, index=False)
    (out / "meta.json").write_text(json.dumps({"stage": "download", "status": "complete", "synthetic": True,
                                               "counts": {"urls": size, "ok": size, "shards": n_shards}}))
    shutil.copytree(base / "demo-data", dest / "demo-data")  # the teacher score.teacher names
    return dest


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = f"{names[0]} × {len(names)}" if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}; {gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


# --------------------------------------------------------------------------------------- measures
def score_vs_forward(model, meta: ModelMeta, shards: list[Path], batch_size: int, num_workers: int,
                     device: torch.device, repeats: int) -> tuple[int, float, torch.Tensor, list[torch.Tensor], float]:
    """The score stage's per-shard pass over ``shards`` vs the model alone on the same images decoded
    beforehand: (samples scored, stage seconds, the decoded images, their normalised batches, forward
    seconds; ``repeats`` as :func:`timed`)."""
    start = time.perf_counter()
    n_scored = sum(teacher_pass(model, meta, s, batch_size, num_workers, device).num_rows for s in shards)
    t_stage = time.perf_counter() - start
    images = torch.cat([b["image"] for b in image_loader(ShardImages(shards, meta.input), batch_size, 0)])
    batches = [normalize(images[i:i + batch_size].to(device), meta.input) for i in range(0, len(images), batch_size)]
    with torch.inference_mode():
        t_fwd = timed(lambda: [model(x) for x in batches], repeats)
    return n_scored, t_stage, images, batches, t_fwd


def measure_compute(base: Path, device: torch.device, repeats: int) -> dict[int, tuple[str, float]]:
    """Targets 1–4 on the base run (real demo shards, real models, the real engine)."""
    cfg = load_config(CONFIG, ["run.num_threads=1", "averaging.modes=[]", *OVERRIDES])
    teacher, meta, _ = load_model(resolve_path(cfg.score.teacher, base), device)
    shards = list_shards(base / layout.DOWNLOAD)
    bs = cfg.score.batch_size
    # 1: the score stage's per-shard pass vs the teacher alone on the same images, decoded beforehand
    n_scored, t_stage, images, batches, t_fwd = score_vs_forward(teacher, meta, shards, bs, cfg.score.num_workers,
                                                                 device, repeats=1)
    out = {1: (f"{n_scored / t_stage:,.0f} img/s from shards vs {len(images) / t_fwd:,.0f} in memory", t_fwd / t_stage)}
    # 1b: the same ratio for a teacher of the size kd3 is meant for (CIFAR ResNet-18 at 32 px, RGB;
    # untrained: its speed does not depend on its weights), on the first shard of the same pool
    rn_meta = ModelMeta("cifar_resnet18", {}, 10, [str(i) for i in range(10)],
                        InputSpec(32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    rn = build_model("cifar_resnet18", 10, 3).to(device).eval()
    n_rn, t_rn_stage, rn_images, _, t_rn_fwd = score_vs_forward(rn, rn_meta, shards[:1], bs, cfg.score.num_workers,
                                                                device, repeats=0)
    out["1b"] = (f"ResNet-18 teacher, 32 px: {n_rn / t_rn_stage:,.0f} img/s from shards vs "
                 f"{len(rn_images) / t_rn_fwd:,.0f} in memory", t_rn_fwd / t_rn_stage)

    trainers = {name: build_trainer(load_config(CONFIG, ["run.num_threads=1", *OVERRIDES, "averaging.modes=[]", *extra]),
                                    base, device, None)[0]
                for name, extra in {"kd": ["train.objective=kd", "train.selector=all"], "kd3": []}.items()}
    kd3 = trainers["kd3"]
    # 2: pool pass (student over the pool from shards) + selection vs teacher + student in memory
    start = time.perf_counter()
    data = kd3.source.epoch(0, kd3.epochs, kd3.student, kd3.meta.input)
    t_pool = time.perf_counter() - start
    student_batches = [normalize(images[i:i + bs].to(device), kd3.meta.input) for i in range(0, len(images), bs)] \
        if kd3.meta.input == meta.input else None
    with torch.inference_mode():
        kd3.student.eval()
        t_student = timed(lambda: [kd3.student(x) for x in (student_batches or batches)], 1)
    out[2] = (f"{t_pool:.2f} s vs teacher {t_fwd:.2f} s + student {t_student:.2f} s", t_pool / (t_fwd + t_student))
    # 3: one training step each, same first batch of the same epoch
    pool = kd3.source.uid_to_row
    gen = torch.Generator().manual_seed(0)
    step = {}
    for name, trainer in trainers.items():
        trainer.objective.train()
        trainer.student.train()
        batch = next(iter(trainer.loader(pool, 0)))
        step[name] = timed(lambda: trainer.train_step(batch, gen), repeats)
    out[3] = (f"{step['kd3'] * 1e3:.1f} ms vs {step['kd'] * 1e3:.1f} ms", step["kd3"] / step["kd"])
    # 4: a whole epoch through the trainer vs pool-pass compute + its steps on batches already in memory
    batches4 = list(kd3.loader(data.rows, 0))
    start = time.perf_counter()
    for b in batches4:
        kd3.train_step(b, gen)
    t_steps = time.perf_counter() - start
    start = time.perf_counter()
    kd3._epoch(0)
    t_epoch = time.perf_counter() - start
    pure = t_steps + t_student
    out[4] = (f"{t_epoch:.2f} s vs {t_steps:.2f} s steps + {t_student:.2f} s student pool forward", t_epoch / pure)
    return out


def measure_download(work: Path, base: Path) -> tuple[str, float]:
    """Target 6: the kd3 download stage vs img2dataset called bare, same list, same loopback files."""
    run = work / "download"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base / "demo-data", run / "demo-data")
    t_kd3, _ = kd3_stage("download", run)
    cfg = load_config(CONFIG, OVERRIDES)
    d = cfg.download
    urls = pd.read_parquet(run / layout.DOWNLOAD / layout.URL_LIST)
    bare = work / "bare"
    shutil.rmtree(bare, ignore_errors=True)
    bare.mkdir(parents=True)
    script = f"""
import os, time, sys, pandas as pd
os.environ['NO_ALBUMENTATIONS_UPDATE'] = '1'
from img2dataset import download
from kd3.data.loopback import serve_directory
urls = pd.read_parquet({str(run / layout.DOWNLOAD / layout.URL_LIST)!r})
with serve_directory({str(run / 'demo-data' / 'web')!r}) as base_url:
    urls['url'] = urls['url'].str.replace('{{port}}', base_url.rsplit(':', 1)[1], regex=False)
    urls.to_parquet({str(bare / 'list.parquet')!r}, index=False)
    download(url_list={str(bare / 'list.parquet')!r}, input_format='parquet', url_col='url',
             save_additional_columns=[c for c in urls.columns if c != 'url'], output_format='webdataset',
             output_folder={str(bare / 'shards')!r}, image_size={d.image_size}, resize_mode={d.resize_mode!r},
             encode_format={d.encode_format!r}, encode_quality={d.resolved_encode_quality}, processes_count={d.processes_count},
             thread_count={d.thread_count}, number_sample_per_shard={d.number_sample_per_shard}, timeout={d.timeout},
             retries={d.retries}, distributor='multiprocessing', enable_wandb=False)
"""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True)
    t_bare = time.perf_counter() - start
    return f"{len(urls)} URLs: {t_kd3:.1f} s vs {t_bare:.1f} s (both with interpreter start)", t_kd3 / t_bare


def measure_scaling(work: Path, base: Path, sizes: list[int], scale: int) -> tuple[list[str], tuple[str, float]]:
    """Targets 5 and 7: stage subprocesses on synthetic pools; time and peak RSS of each."""
    rows, rss = [], {}
    small = min(sizes)
    for size in sorted(set(sizes) | {small * scale}):
        run = synthetic_download(base, work / f"pool-{size}", size)
        t_score, m_score = kd3_stage("score", run)
        t_select, m_select = kd3_stage("select", run)
        if size in (small, small * scale):
            _, m_train = kd3_stage("train", run, "train.epochs=1", "averaging.modes=[]")
            rss[size] = (m_score, m_select, m_train)
        if size in sizes:
            rows.append(f"| {size:,} | {t_score:.1f} | {size / t_score:,.0f} | {t_select:.1f} | {m_score:.0f} | {m_select:.0f} |")
    ratios = [b / a for a, b in zip(rss[small], rss[small * scale])]
    detail = (f"{small:,} → {small * scale:,}: score {rss[small][0]:.0f} → {rss[small * scale][0]:.0f} MB, "
              f"select {rss[small][1]:.0f} → {rss[small * scale][1]:.0f} MB, train {rss[small][2]:.0f} → "
              f"{rss[small * scale][2]:.0f} MB")
    return rows, (detail, max(ratios))


def verdict(n: int, ratio: float) -> str:
    op, target = TARGETS[n]
    met = ratio >= target if op == ">=" else ratio <= target
    return f"{op} {target} | {'met' if met else 'MISSED'}"


def main() -> None:
    global CONFIG
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/perf", type=Path)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--scale", type=int, default=10, help="pool-size factor for the memory ratio (target 5)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions of one training step")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing useful")
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every stage")
    args = parser.parse_args()
    CONFIG = args.config.resolve()
    OVERRIDES[:] = args.overrides
    if args.quick:
        args.sizes, args.scale, args.repeats = "100", 2, 2
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(1)  # the stages run with run.num_threads=1 too: one core each, comparable
    device = torch.device("cpu")
    work = args.run_dir
    base = work / "base"
    started = time.perf_counter()
    ensure_base(base)
    results = measure_compute(base, device, args.repeats)
    results[6] = measure_download(work, base)
    table7, results[5] = measure_scaling(work, base, sizes, args.scale)
    names = {1: "score stage ÷ teacher forward in memory", "1b": "the same, a ResNet-18 teacher", 2: "pool pass + selection ÷ teacher + student forward",
             3: "KD³ step ÷ plain KD step", 4: "KD³ epoch end to end ÷ its compute",
             5: f"peak RSS at {args.scale}× pool ÷ 1× (worst stage)", 6: "download stage ÷ bare img2dataset"}
    lines = [f"Machine: {machine()}; measured {time.strftime('%Y-%m-%d')} by "
             f"`python benchmarks/perf.py{' --quick' if args.quick else ''} --sizes {args.sizes} --scale {args.scale}` "
             f"({time.perf_counter() - started:.0f} s).", "",
             "| # | measure | measured | ratio | target | |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {names[n]} | {results[n][0]} | {results[n][1]:.2f} | {verdict(n, results[n][1])} |" for n in sorted(results, key=str)]
    lines += ["", "Target 7, stages in child processes on synthetic pools (demo images re-keyed), one thread:", "",
              "| pool | score s | score img/s | select s | score peak RSS MB | select peak RSS MB |",
              "|---|---|---|---|---|---|", *table7]
    text = "\n".join(lines)
    print(text)
    if args.write:
        bench = ROOT / "BENCHMARKS.md"
        doc = bench.read_text()
        block = f"{MARK_BEGIN}\n{text}\n{MARK_END}"
        if MARK_BEGIN in doc:
            doc = doc[:doc.index(MARK_BEGIN)] + block + doc[doc.index(MARK_END) + len(MARK_END):]
        else:
            doc += f"\n## Performance (issue 12 targets)\n\n{block}\n"
        bench.write_text(doc)
        print(f"perf: wrote {bench}")


if __name__ == "__main__":
    main()
