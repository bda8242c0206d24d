"""How much does each part of a KD³ training step cost, relative to a plain student step?

Prints ratios measured in one run on the same machine (never asserted anywhere):
  - plain KD step (cached teacher logits)          / raw student forward+backward
  - KD³ step (teacher features, projector, MixDistribution, both contrastive terms) / raw student step
  - KD³ step without the teacher-side contrastive term / raw student step
  - reading + decoding + resizing a batch from the shards / raw student step   (needs a run folder)
  - student pass over the pool for selection (per image) / raw student forward (per image)

Usage: python benchmarks/train_overhead.py [--run-dir runs/demo] [--config pipelines/demo.yaml]
       [--batch-size 64] [--steps 30] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kd3.config import load_config
from kd3.data.images import normalize
from kd3.data.shards import ShardImages, image_loader, list_shards
from kd3.methods.objectives import KD3Objective, KDObjective
from kd3.models import build_model
from kd3.models.distilled import distilled_from_teacher


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
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    cfg = load_config(args.config)
    device = torch.device(args.device)
    torch.manual_seed(0)
    size, k = cfg.demo_data.image_size, 10
    teacher = build_model(cfg.demo_data.teacher.arch, k, 1, cfg.demo_data.teacher.options).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.randn(args.batch_size, 1, size, size, device=device)
    z_t = torch.randn(args.batch_size, k, device=device)
    map_shape = tuple(teacher.forward_features(x[:1]).shape[1:])

    def sgd_step(objective):
        opt = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=0.01)
        gen = torch.Generator().manual_seed(0)

        def step():
            out = objective(x, x, z_t, gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        return step

    student = build_model(cfg.train.student.arch, k, 1, cfg.train.student.options).to(device)
    raw_opt = torch.optim.SGD(student.parameters(), lr=0.01)

    def raw_step():
        loss = student(x).logsumexp(1).mean()
        raw_opt.zero_grad(set_to_none=True)
        loss.backward()
        raw_opt.step()

    t_raw = timed(raw_step, args.steps, device)
    t_kd = timed(sgd_step(KDObjective(student, 4.0).to(device)), args.steps, device)
    backbone = build_model(cfg.train.student.arch, k, 1, cfg.train.student.options)
    shared = distilled_from_teacher(backbone, teacher, map_shape).to(device)
    t_kd3 = timed(sgd_step(KD3Objective(shared, teacher, map_shape).to(device)), args.steps, device)
    backbone2 = build_model(cfg.train.student.arch, k, 1, cfg.train.student.options)
    shared2 = distilled_from_teacher(backbone2, teacher, map_shape).to(device)
    t_kd3_not = timed(sgd_step(KD3Objective(shared2, teacher, map_shape, teacher_contrastive=False).to(device)),
                      args.steps, device)
    with torch.no_grad():
        shared.eval()
        t_fwd = timed(lambda: shared(x), args.steps, device)
    print(f"device {device}, batch {args.batch_size}, image {size}px, {args.steps} steps each")
    print(f"raw student step (fwd+bwd+SGD)        {t_raw * 1e3:8.2f} ms   1.00x")
    print(f"plain KD step                         {t_kd * 1e3:8.2f} ms   {t_kd / t_raw:.2f}x")
    print(f"KD³ step (full)                       {t_kd3 * 1e3:8.2f} ms   {t_kd3 / t_raw:.2f}x")
    print(f"KD³ step, teacher_contrastive=off     {t_kd3_not * 1e3:8.2f} ms   {t_kd3_not / t_raw:.2f}x")
    print(f"KD³ student inference (selection)     {t_fwd * 1e3:8.2f} ms   {t_fwd / t_raw:.2f}x of a raw step")
    run_dir = Path(args.run_dir)
    if (run_dir / "download" / "shards").is_dir():
        from kd3.models.checkpoints import InputSpec

        spec = InputSpec(image_size=size, channels=1, mean=(0.2,), std=(0.3,))
        loader = image_loader(ShardImages(list_shards(run_dir / "download"), spec), args.batch_size, 0)
        start, batches = time.perf_counter(), 0
        for batch in loader:
            normalize(batch["image"], spec)
            batches += 1
        t_load = (time.perf_counter() - start) / max(batches, 1)
        print(f"shard read+decode+resize per batch    {t_load * 1e3:8.2f} ms   {t_load / t_raw:.2f}x  "
              f"({batches} batches from {run_dir / 'download'}, num_workers=0)")
    else:
        print(f"(no shards in {run_dir / 'download'}: run `make demo` first to time data loading)")


if __name__ == "__main__":
    main()
