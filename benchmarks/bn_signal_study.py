"""How well teacher signals tell in-domain pool images from distractors (a printed measurement, not a test).

For every scored pool sample of a run (demo-data → download → score done), computes the teacher's
BatchNorm in-domain scores (kd3.methods.ood: mean term, mean + variance term, squared and absolute
distances, early / late layers, each layer alone), max-softmax and energy, and prints for each signal
the AUROC of "is in-domain" (``source == "mnist"`` in the URL list's ground truth, never used by the
pipeline) and the purity (share of in-domain samples) among the top 25 / 50 / 75 % ranked samples.
Every signal is oriented so that higher = more in-domain (BN scores and energy are negated).

    .venv/bin/python benchmarks/bn_signal_study.py --run-dir runs/demo
    .venv/bin/python benchmarks/bn_signal_study.py --run-dir runs/hard --json runs/hard/bn_signal_study.json

Reads ``RUN/demo-data/teacher.pt``, ``RUN/download/url_list.parquet`` (the URL list with uid, source,
demo_label), ``RUN/download/shards`` and ``RUN/score/teacher_outputs.parquet``; joins on uid, the
SHA-256 of the template URL (with ``{port}``, as download computes it), and checks that join.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kd3 import layout
from kd3.data.images import normalize
from kd3.data.manifest import url_uid
from kd3.data.shards import ShardImages, image_loader, list_shards
from kd3.methods.ood import batchnorm_layers, bn_scores, combine_layers, energy, max_softmax
from kd3.models import load_model
from kd3.data.score_cache import load_teacher_outputs

QUANTILES = (0.25, 0.5, 0.75)


def ground_truth(run_dir: Path) -> pd.DataFrame:
    """uid, url, source, demo_label of every URL in the download's list; checks uid = url_uid(url)."""
    path = run_dir / layout.DOWNLOAD / layout.URL_LIST
    urls = pd.read_parquet(path)
    missing = {"uid", "url", "source"} - set(urls.columns)
    if missing:
        sys.exit(f"{path} lacks columns {sorted(missing)} (a demo URL list?)")
    recomputed = urls["url"].map(url_uid)
    if not (recomputed == urls["uid"]).all():
        sys.exit("uid in the download's URL list is not url_uid(url) of the template URL")
    return urls


@torch.no_grad()
def pool_bn_terms(model, meta, shards, uid_to_row, batch_size):
    """Per-layer BN terms for every scored sample, in score-cache row order, plus recomputed logits.

    Returns {"mean_sq", "mean_abs", "var_sq", "var_abs"} → [N, L] and logits [N, K]."""
    n = len(uid_to_row)
    layers = [name for name, _ in batchnorm_layers(model)]
    terms = {key: torch.full((n, len(layers)), float("nan")) for key in ("mean_sq", "mean_abs", "var_sq", "var_abs")}
    logits = torch.full((n, meta.num_classes), float("nan"))
    loader = image_loader(ShardImages(shards, meta.input, uid_to_row=uid_to_row), batch_size, 0)
    for batch in loader:
        rows = batch["row"]
        x = normalize(batch["image"], meta.input)
        for distance, suffix in (("squared", "sq"), ("absolute", "abs")):
            mean_only = bn_scores(model, x, distance=distance)
            with_var = bn_scores(model, x, distance=distance, variance_weight=1.0)
            terms[f"mean_{suffix}"][rows] = mean_only.per_layer
            terms[f"var_{suffix}"][rows] = with_var.per_layer - mean_only.per_layer
        logits[rows] = model(x).float()
    if torch.isnan(logits[:, 0]).any():
        sys.exit(f"{int(torch.isnan(logits[:, 0]).sum())} scored samples were not found in the shards")
    return terms, logits, layers


def purity(signal: np.ndarray, positive: np.ndarray, share: float) -> float:
    """Share of positives among the top ``share`` of samples ranked by ``signal`` (highest first)."""
    k = max(1, int(round(share * len(signal))))
    order = np.argsort(-signal, kind="stable")
    return float(positive[order[:k]].mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    start = time.perf_counter()
    run_dir = args.run_dir
    truth = ground_truth(run_dir)
    cache = load_teacher_outputs(run_dir, "bn_signal_study")
    frame = cache.frame.merge(truth[["uid", "source", "demo_label"]], on="uid", how="left", validate="one_to_one")
    if frame["source"].isna().any():
        sys.exit(f"{int(frame['source'].isna().sum())} scored uids are not in the URL list")
    positive = (frame["source"] == "mnist").to_numpy()
    model, meta, _ = load_model(run_dir / layout.DEMO_DATA / "teacher.pt")
    model.eval()
    terms, logits, layers = pool_bn_terms(model, meta, list_shards(run_dir / layout.DOWNLOAD), cache.uid_to_row,
                                          args.batch_size)
    drift = (logits - cache.logits).abs().max().item()
    half = len(layers) // 2
    early, late = [1.0] * half + [0.0] * (len(layers) - half), [0.0] * half + [1.0] * (len(layers) - half)
    # every signal: higher = more in-domain
    signals: dict[str, torch.Tensor] = {
        "max_softmax": max_softmax(cache.logits),
        "-energy": -energy(cache.logits),
        "-bn mean sq (all)": -combine_layers(terms["mean_sq"]),
        "-bn mean abs (all)": -combine_layers(terms["mean_abs"]),
        "-bn mean+var sq (all)": -combine_layers(terms["mean_sq"] + terms["var_sq"]),
        "-bn mean+var abs (all)": -combine_layers(terms["mean_abs"] + terms["var_abs"]),
        "-bn var sq (all)": -combine_layers(terms["var_sq"]),
        "-bn var abs (all)": -combine_layers(terms["var_abs"]),
        f"-bn mean sq (early {half})": -combine_layers(terms["mean_sq"], early),
        f"-bn mean sq (late {len(layers) - half})": -combine_layers(terms["mean_sq"], late),
        f"-bn mean abs (early {half})": -combine_layers(terms["mean_abs"], early),
        f"-bn mean abs (late {len(layers) - half})": -combine_layers(terms["mean_abs"], late),
        f"-bn mean+var sq (early {half})": -combine_layers(terms["mean_sq"] + terms["var_sq"], early),
        f"-bn mean+var sq (late {len(layers) - half})": -combine_layers(terms["mean_sq"] + terms["var_sq"], late),
    }
    for i, name in enumerate(layers):
        signals[f"-bn mean sq layer {i} ({name})"] = -terms["mean_sq"][:, i]
    for i, name in enumerate(layers):
        signals[f"-bn mean+var sq layer {i} ({name})"] = -(terms["mean_sq"][:, i] + terms["var_sq"][:, i])
    rows = []
    for name, values in signals.items():
        v = values.double().numpy()
        rows.append({"signal": name, "auroc": float(roc_auc_score(positive, v)),
                     **{f"purity@{int(q * 100)}%": purity(v, positive, q) for q in QUANTILES}})
    by_source = ", ".join(f"{k} {v}" for k, v in frame["source"].value_counts().items())
    print(f"run {run_dir}: {len(frame)} scored samples, {int(positive.sum())} in-domain (source mnist), "
          f"{int((~positive).sum())} other ({by_source}); "
          f"teacher {meta.arch} {meta.input.channels}x{meta.input.image_size}px, {len(layers)} BatchNorm2d layers; "
          f"max |recomputed - cached logits| {drift:.2e}")
    print(f"purity of the whole pool (chance): {positive.mean():.3f}; AUROC chance 0.5; higher = better\n")
    width = max(len(r["signal"]) for r in rows)
    header = f"| {'signal':<{width}} | AUROC | " + " | ".join(f"top {int(q * 100)}%" for q in QUANTILES) + " |"
    print(header)
    print("|" + "-" * (width + 2) + "|-------|" + "|".join("-" * 9 for _ in QUANTILES) + "|")
    ceiling = " | ".join(f"{min(1.0, positive.mean() / q):7.3f}" for q in QUANTILES)
    print(f"| {'(best possible)':<{width}} | 1.000 | {ceiling} |")
    for r in rows:
        cells = " | ".join(f"{r[f'purity@{int(q * 100)}%']:7.3f}" for q in QUANTILES)
        print(f"| {r['signal']:<{width}} | {r['auroc']:.3f} | {cells} |")
    print(f"\n({time.perf_counter() - start:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps({"run_dir": str(run_dir), "n": len(frame), "in_domain": int(positive.sum()),
                                         "layers": layers, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
