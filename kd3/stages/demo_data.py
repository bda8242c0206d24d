"""demo-data: train the demo teacher on private digits and write the web pool for the loopback crawl.

Outputs in ``RUN/demo-data/``: ``teacher.pt`` (kd3 checkpoint), ``private_test.npz`` (the private
test split: images uint8 [N,S,S], or [N,3,S,S] with ``demo_data.channels`` 3, labels),
``private_train.npz`` (the teacher's training split, same layout; only the quality benchmark's
original-data ceiling reads it — no distillation stage does),
``mnist_shifted_test.npz`` (MNIST digits kept out of the pool, with true labels: a shifted
evaluation domain; shifted like the pool's digits by ``demo_data.web_shift``), ``web/`` (files
the loopback server serves),
``teacher_metrics.jsonl``; and the URL list at ``demo_data.url_list``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kd3.config import PipelineConfig
from kd3.data.demo import private_digits, random_affine, write_web_pool
from kd3.data.images import as_nchw_uint8
from kd3.inference import batch_logits
from kd3.models import InputSpec, ModelMeta, build_model, load_model, save_checkpoint
from kd3.runs import StageDir, append_jsonl, atomic_path
from kd3.runtime import configure

log = logging.getLogger(__name__)

NAME = "demo-data"
SUMMARY = "train the demo teacher on private digits; write the web pool and its URL list"
SECTIONS = ("demo_data",)


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    return {}


def _train_teacher(cfg: PipelineConfig, out: StageDir, device: torch.device):
    dd = cfg.demo_data
    color = dd.private_color if dd.channels == 3 else None
    x_train, y_train, x_test, y_test = private_digits(dd.image_size, dd.test_fraction, cfg.run.seed, color)
    pixels = x_train.float() / 255.0
    if dd.channels == 1:  # statistics of the whole tensor, exactly as the grey demo teacher was always built
        spec = InputSpec(image_size=dd.image_size, channels=1, mean=(round(pixels.mean().item(), 4),),
                         std=(round(pixels.std().item(), 4),))
    else:
        spec = InputSpec(image_size=dd.image_size, channels=dd.channels,
                         mean=tuple(round(v, 4) for v in pixels.mean(dim=(0, 2, 3)).tolist()),
                         std=tuple(round(v, 4) for v in pixels.std(dim=(0, 2, 3)).tolist()))
    meta = ModelMeta(arch=dd.teacher.arch, options=dd.teacher.options, num_classes=10,
                     class_names=[str(i) for i in range(10)], input=spec)
    model = build_model(meta.arch, meta.num_classes, spec.channels, meta.options).to(device)
    steps_per_epoch = -(-len(y_train) // dd.teacher_batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=dd.teacher_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=dd.teacher_lr,
                                                    total_steps=dd.teacher_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    x_test_n = ((x_test.float() / 255.0 - mean) / std).to(device)
    for epoch in range(dd.teacher_epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(order), dd.teacher_batch_size):
            idx = order[start:start + dd.teacher_batch_size]
            # augment in [0, 1] space (zero = background), then normalise
            xb = random_affine(x_train[idx].float() / 255.0, gen)
            xb, yb = ((xb - mean) / std).to(device), y_train[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            total += len(idx)
        model.eval()
        with torch.no_grad():
            test_acc = (model(x_test_n).argmax(1).cpu() == y_test).float().mean().item()
        record = {"epoch": epoch, "loss": loss_sum / total, "train_acc": correct / total, "private_test_acc": test_acc}
        append_jsonl(out.path / "teacher_metrics.jsonl", record)
        log.info(f"[{NAME}] teacher epoch {epoch + 1}/{dd.teacher_epochs}: loss {record['loss']:.3f} "
                 f"train acc {record['train_acc']:.3f} private test acc {test_acc:.3f}")
    save_checkpoint(out.path / "teacher.pt", model, meta, trained_on="sklearn digits (private train split)")
    return x_train, y_train, x_test, y_test, test_acc


def _save_npz(path: Path, **arrays: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    device = configure(cfg.run)
    dd = cfg.demo_data
    x_train, y_train, x_test, y_test, test_acc = _train_teacher(cfg, out, device)
    n_train = len(y_train)
    # grey: [N, S, S] as before; RGB: [N, 3, S, S]
    test_images = x_test[:, 0] if dd.channels == 1 else x_test
    _save_npz(out.path / "private_test.npz", images=test_images.numpy(), labels=y_test.numpy())
    # the teacher's own training data: only the benchmark's original-data reference (the ceiling) reads it
    train_images = x_train[:, 0] if dd.channels == 1 else x_train
    _save_npz(out.path / "private_train.npz", images=train_images.numpy(), labels=y_train.numpy())
    urls, held_out = write_web_pool(out.path / "web", dd.web_mnist, dd.web_natural_crops, dd.web_broken, cfg.run.seed,
                                    dd.web_shift)
    _save_npz(out.path / "mnist_shifted_test.npz", images=held_out["images"], labels=held_out["labels"])
    url_list = Path(dd.url_list)
    with atomic_path(url_list) as tmp:
        urls.to_parquet(tmp, index=False)
    log.info(f"[{NAME}] teacher private test accuracy {test_acc:.4f}; web pool of {len(urls)} URLs -> {url_list}")
    counts = {"private_train": n_train, "private_test": len(y_test), "teacher_private_test_acc": round(test_acc, 4),
              "web_urls": len(urls), "web_by_source": urls["source"].value_counts().to_dict(),
              "mnist_shifted_test": len(held_out["labels"]), "url_list": str(url_list)}
    if len(held_out["labels"]):
        shifted_acc = _accuracy(out.path / "teacher.pt", held_out, device)
        counts["teacher_mnist_shifted_test_acc"] = round(shifted_acc, 4)
        log.info(f"[{NAME}] teacher accuracy on the shifted held-out digits {shifted_acc:.4f}")
    return counts


def _accuracy(teacher: Path, held_out: dict[str, np.ndarray], device: torch.device) -> float:
    """Top-1 of the saved teacher on held-out images, prepared exactly as evaluation prepares them."""
    model, meta, _ = load_model(teacher, device)
    model.eval()
    images = as_nchw_uint8(held_out["images"])
    logits = torch.cat([batch_logits(model, meta.input, images[i:i + 512], device) for i in range(0, len(images), 512)])
    return (logits.argmax(1) == torch.from_numpy(held_out["labels"])).float().mean().item()
