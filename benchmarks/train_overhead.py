"""How much does each part of training cost, relative to a raw student step? Times the real engine.

Builds the trainers `kd3 train` builds (kd3.training.build_trainer, nothing written) on a finished
run folder and times their real ``train_step`` on a real batch from their real loader. Prints
ratios measured in one run on the same machine (never asserted anywhere):
  - plain KD step (objective kd)                              / raw student forward+backward+SGD
  - KD³ step, paper settings (teacher-side contrastive term)  / raw student step
  - KD³ step without the teacher-side contrastive term        / raw student step
  - KD³ step as the pipeline trains it by default (+ KL term) / raw student step
  - reading + decoding + resizing one batch (the epoch loader) / raw student step
  - KD³ per-epoch pool pass + selection (kd3_dynamic), per image, decoding included / raw student forward per image

Usage: python benchmarks/train_overhead.py [--run-dir runs/demo] [--config pipelines/demo.yaml]
       [--steps 30] [--device cpu|cuda] [key=value overrides, e.g. train.batch_size=128]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kd3.config import load_config
from kd3.data.images import normalize
from kd3.models import build_model
from kd3.training.build import build_trainer


def timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up (allocations, lazy init)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pipelines/demo.yaml")
    parser.add_argument("--run-dir", default="runs/demo", help="a run folder with finished download and score")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    device, run_dir = torch.device(args.device), Path(args.run_dir)
    base = [f"run.device={args.device}", "averaging.modes=[]", *args.overrides]
    trainers = {
        "kd": build_trainer(load_config(args.config, [*base, "train.objective=kd", "train.selector=all"]),
                            run_dir, device, None)[0],
        "kd3_paper": build_trainer(load_config(args.config, [*base, "train.objective=kd3", "train.selector=kd3_dynamic",
                                                             "kd3.teacher_contrastive=on", "kd3.kl_weight=0"]),
                                   run_dir, device, None)[0],
        "kd3_no_tcon": build_trainer(load_config(args.config, [*base, "train.objective=kd3", "train.selector=kd3_dynamic",
                                                               "kd3.teacher_contrastive=off", "kd3.kl_weight=0"]),
                                     run_dir, device, None)[0],
        "kd3": build_trainer(load_config(args.config, [*base, "train.objective=kd3", "train.selector=kd3_dynamic"]),
                             run_dir, device, None)[0],
    }
    kd3 = trainers["kd3"]
    pool = kd3.source.uid_to_row
    batch = next(iter(kd3.loader(pool, 0)))
    batch_size = len(batch["row"])
    gen = torch.Generator().manual_seed(0)
    cfg = load_config(args.config, base)
    spec = kd3.meta.input
    student = build_model(cfg.train.student.arch, kd3.meta.num_classes, spec.channels, cfg.train.student.options)
    student = student.to(device).train()
    raw_opt = torch.optim.SGD(student.parameters(), lr=0.01)
    x = normalize(batch["image"].to(device), spec)

    def raw_step():
        loss = student(x).logsumexp(1).mean()
        raw_opt.zero_grad(set_to_none=True)
        loss.backward()
        raw_opt.step()

    t_raw = timed(raw_step, args.steps, device)
    times = {}
    for name, trainer in trainers.items():
        trainer.objective.train()
        b = next(iter(trainer.loader(pool, 0)))  # each trainer's own views of the same first batch
        times[name] = timed(lambda: trainer.train_step(b, gen), args.steps, device)
    n_load = 0
    start = time.perf_counter()
    for _ in kd3.loader(pool, 0):
        n_load += 1
    t_load = (time.perf_counter() - start) / max(n_load, 1)
    with torch.no_grad():
        student.eval()
        t_fwd = timed(lambda: student(x), args.steps, device) / batch_size
    start = time.perf_counter()
    kd3.source.epoch(0, cfg.train.epochs, kd3.student, spec)
    t_pool = (time.perf_counter() - start) / len(pool)
    print(f"device {device}, batch {batch_size}, student input {spec.image_size}px × {spec.channels}, "
          f"{args.steps} steps each, pool {len(pool)} ({run_dir})")
    print(f"raw student step (fwd+bwd+SGD)             {t_raw * 1e3:8.2f} ms   1.00x")
    print(f"plain KD step (objective kd)               {times['kd'] * 1e3:8.2f} ms   {times['kd'] / t_raw:.2f}x")
    print(f"KD³ step, paper settings                   {times['kd3_paper'] * 1e3:8.2f} ms   "
          f"{times['kd3_paper'] / t_raw:.2f}x")
    print(f"KD³ step, teacher_contrastive=off          {times['kd3_no_tcon'] * 1e3:8.2f} ms   "
          f"{times['kd3_no_tcon'] / t_raw:.2f}x")
    print(f"KD³ step, pipeline default (+ KL term)     {times['kd3'] * 1e3:8.2f} ms   {times['kd3'] / t_raw:.2f}x")
    print(f"epoch loader, read+decode+resize per batch {t_load * 1e3:8.2f} ms   {t_load / t_raw:.2f}x  "
          f"({n_load} batches, num_workers={kd3.workers.num_workers})")
    print(f"KD³ pool pass + selection per image        {t_pool * 1e6:8.1f} µs   {t_pool / t_fwd:.2f}x "
          "a raw student forward per image (PNG decoding included)")


if __name__ == "__main__":
    main()
