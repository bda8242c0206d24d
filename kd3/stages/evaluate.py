"""evaluate: teacher and students (averaged ones too) on labelled evaluation sets and the distillation data.

For every evaluation set (an .npz, an image folder with class-named sub-folders, or webdataset
shards; see ``kd3/data/eval_sets.py``) and every model: top-1 / top-5 accuracy, ECE
(``evaluate.ece_bins`` bins), per-class accuracy and, for students, top-1 agreement with the
teacher and KL(p_T ‖ p_S) at τ = 1 (METHODS.md §3). On the distillation data (a sample of the
scored pool, ``evaluate.distillation_samples``) each student's agreement and KL against the score
cache's teacher logits. Each batch is decoded once and fed to every model at its own input size.

Outputs in ``RUN/evaluate/``: ``report.json`` (every number, per-class accuracy, reliability
bins), ``report.md`` (a comparison table: one row per model, accuracy / agreement / KL / ECE per
dataset; the long table; per-class accuracy) and ``reliability_<dataset>.png`` (one reliability
diagram per model). The comparison table is printed.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from kd3 import layout
from kd3.compute import Compute
from kd3.config import PipelineConfig, require_file, resolve_path
from kd3.data import eval_sets, subsets
from kd3.data.score_cache import load_teacher_outputs, require_score
from kd3.data.shards import list_shards
from kd3.errors import ConfigError, Kd3Error
from kd3.inference import batch_logits, pool_logits
from kd3.methods.fidelity import fidelity_report, per_class_accuracy, reliability_bins
from kd3.models import ModelMeta, check_checkpoint_code, load_model, read_checkpoint
from kd3.progress import Progress
from kd3.runs import StageDir, atomic_path, atomic_write_json, atomic_write_text, check_skipped, file_fingerprint, read_meta
from kd3.runs import stage_input_fingerprint

log = logging.getLogger(__name__)

NAME = "evaluate"
SUMMARY = "accuracy, agreement, KL, ECE and per-class accuracy of teacher and students; reliability diagrams"
SECTIONS = ("evaluate",)
DISTILLATION = "distillation_data"
#: per-class tables in report.md only up to this many classes (report.json always has them)
PER_CLASS_MD_MAX = 20


def _checkpoints(cfg: PipelineConfig, run_dir: Path) -> dict[str, Path]:
    e = cfg.evaluate
    paths = {"teacher": resolve_path(e.teacher, run_dir)}
    paths.update({f"students.{name}": resolve_path(p, run_dir) for name, p in e.students.items()})
    return paths


def _uses_pool(cfg: PipelineConfig, run_dir: Path) -> bool:
    """Distillation-data metrics need a finished score stage in this run (else they are skipped)."""
    meta = read_meta(run_dir / layout.SCORE)
    return cfg.evaluate.distillation_samples != 0 and meta is not None and meta.get("status") == "complete"


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    e = cfg.evaluate
    if "teacher" in e.students:
        raise ConfigError(f"{cfg.source}: evaluate.students: the name 'teacher' is reserved for evaluate.teacher")
    inputs = {}
    metas = {}
    for key, path in _checkpoints(cfg, run_dir).items():
        require_file(cfg, f"evaluate.{key}", path, "run the earlier stages first or fix the path")
        check_checkpoint_code(path)
        metas[key] = ModelMeta.from_dict(read_checkpoint(path)["model"])
        inputs[key] = file_fingerprint(path)
        if metas[key].num_classes != metas["teacher"].num_classes:
            raise Kd3Error(f"{path}: evaluate.{key} has {metas[key].num_classes} classes, the teacher "
                           f"(evaluate.teacher) has {metas['teacher'].num_classes}")
    class_names = list(metas["teacher"].class_names)
    for d in e.datasets:
        path = resolve_path(d.path, run_dir)
        try:
            kind = eval_sets.detect_format(path, d.format)
            if kind == "folder":
                eval_sets.class_folders(path, class_names)  # unknown class names fail before any work
            elif kind == "npz":
                eval_sets.NpzEvalSet(d.name, path, len(class_names))  # dtype, shape and label checks
            else:
                for shard in eval_sets.shard_paths(path):
                    eval_sets.check_tar(shard)
            inputs[f"datasets.{d.name}"] = eval_sets.fingerprint(path, kind)
        except Kd3Error as exc:
            raise ConfigError(f"{cfg.source}: evaluate.datasets.{d.name}: {exc}") from None
    if _uses_pool(cfg, run_dir):
        require_score(run_dir, NAME)
        inputs["score"] = stage_input_fingerprint(run_dir, layout.SCORE)
    return inputs


def _json_float(value: float) -> Optional[float]:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _row(dataset: str, model: str, logits: torch.Tensor, labels: torch.Tensor, class_names: list[str],
         teacher_logits: Optional[torch.Tensor], n_bins: int) -> dict[str, Any]:
    report = fidelity_report(logits, teacher_logits, labels, n_bins)
    bins = reliability_bins(logits, labels, n_bins)
    per_class = per_class_accuracy(logits, labels, len(class_names))
    return {"dataset": dataset, "model": model, "n": len(labels), **report,
            "per_class": {name: _json_float(v) for name, v in zip(class_names, per_class.tolist())},
            "reliability": {"confidence": [_json_float(v) for v in bins["confidence"].tolist()],
                            "accuracy": [_json_float(v) for v in bins["accuracy"].tolist()],
                            "count": [int(v) for v in bins["count"].tolist()]}}


# ------------------------------------------------------------------------------------------- output
def _cell(value: Optional[float], digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def long_table(rows: list[dict[str, Any]]) -> str:
    header = ["dataset", "model", "top1", "top5", "ece", "agreement", "kl", "Δtop1 vs teacher"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["dataset"], r["model"]] + [_cell(r.get(k)) for k in ("top1", "top5", "ece", "agreement", "kl")]
        cells.append("—" if r.get("delta_top1") is None else f"{r['delta_top1']:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(models: list[str], datasets: list[str], rows: list[dict[str, Any]],
                     distillation: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """One row per model: top-1 / agreement / KL / ECE per dataset, then agreement / KL on the
    distillation data. Returns (markdown, the same as JSON records)."""
    by_key = {(r["dataset"], r["model"]): r for r in rows + distillation}
    header = ["model"]
    for d in datasets:
        header += [f"{d} top-1", "agree", "KL", "ECE"]
    if distillation:
        header += [f"{DISTILLATION} agree", "KL"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    records = []
    for m in models:
        cells, record = [m], {"model": m}
        for d in datasets:
            r = by_key.get((d, m), {})
            values = [r.get("top1"), r.get("agreement"), r.get("kl"), r.get("ece")]
            cells += [_cell(v, 3) for v in values]
            record[d] = dict(zip(("top1", "agreement", "kl", "ece"), values))
        if distillation:
            r = by_key.get((DISTILLATION, m), {})
            cells += [_cell(r.get("agreement"), 3), _cell(r.get("kl"), 3)]
            record[DISTILLATION] = {"agreement": r.get("agreement"), "kl": r.get("kl")}
        lines.append("| " + " | ".join(cells) + " |")
        records.append(record)
    return "\n".join(lines), records


def per_class_table(dataset: str, rows: list[dict[str, Any]]) -> str:
    mine = [r for r in rows if r["dataset"] == dataset]
    classes = list(mine[0]["per_class"])
    lines = ["| class | " + " | ".join(r["model"] for r in mine) + " |", "|" + "---|" * (len(mine) + 1)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(_cell(r["per_class"][c], 3) for r in mine) + " |")
    return "\n".join(lines)


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def reliability_plot(path: Path, dataset: str, rows: list[dict[str, Any]]) -> Path:
    """One reliability diagram per model (accuracy per confidence bin against the diagonal)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(len(rows), 4)
    lines = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * lines))
    FigureCanvasAgg(fig)
    for i, r in enumerate(rows):
        ax = fig.add_subplot(lines, cols, i + 1)
        n_bins = len(r["reliability"]["count"])
        edges = np.arange(n_bins) / n_bins
        acc = np.array([np.nan if v is None else v for v in r["reliability"]["accuracy"]], dtype=float)
        conf = np.array([np.nan if v is None else v for v in r["reliability"]["confidence"]], dtype=float)
        filled = ~np.isnan(acc)
        ax.bar(edges[filled], acc[filled], width=1 / n_bins, align="edge", color="tab:blue", edgecolor="black",
               linewidth=0.5, label="accuracy")
        ax.bar(edges[filled], (conf - acc)[filled], bottom=acc[filled], width=1 / n_bins, align="edge",
               color="tab:red", alpha=0.3, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{r['model']}\nECE {r['ece']:.3f}, top-1 {r['top1']:.3f}")
        ax.title.set_fontsize(9)
        if i == 0:
            ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"reliability: {dataset} ({rows[0]['n']} images)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


# ------------------------------------------------------------------------------------------- the run
def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    from kd3.runtime import configure

    device = configure(cfg.run)
    compute = Compute.from_config(cfg.run, device)
    e = cfg.evaluate
    run_dir = out.run_dir
    paths = _checkpoints(cfg, run_dir)
    teacher, teacher_meta, _ = load_model(paths["teacher"], device)
    class_names = list(teacher_meta.class_names)
    models = {"teacher": (compute.model(teacher), teacher_meta)}
    for name in e.students:
        model, meta, _ = load_model(paths[f"students.{name}"], device)  # class counts were checked in check()
        models[name] = (compute.model(model), meta)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    plots = []
    sets = [(d, eval_sets.open_eval_set(d.name, resolve_path(d.path, run_dir), class_names, d.format, d.label_key))
            for d in e.datasets]
    pool = None
    if e.distillation_samples != 0 and e.students:
        if _uses_pool(cfg, run_dir):
            scores = load_teacher_outputs(run_dir)
            uids = list(scores.frame["uid"])
            n = len(uids) if e.distillation_samples is None else min(e.distillation_samples, len(uids))
            chosen = subsets.uid_hash_rows(uids, n, subsets.DISTILLATION_SAMPLE).tolist()
            pool = ({scores.frame["uid"].iloc[r]: i for i, r in enumerate(chosen)},
                    scores.logits[torch.tensor(chosen, dtype=torch.long)], scores.pixels)
        else:
            log.info(f"[{NAME}] note: no finished score stage in {run_dir}: agreement on the distillation data "
                     "skipped (evaluate.distillation_samples=0 silences this)")
    # one progress count for the whole stage: each evaluation image (through every model at once), then
    # each pool sample once per student
    sizes = [data.size for _, data in sets]
    total = None if None in sizes else sum(sizes) + (len(pool[0]) * len(e.students) if pool else 0)
    progress = Progress(desc=f"[{NAME}] images through {len(models)} model(s)", unit="images", total=total)
    for d, data in sets:
        logits: dict[str, list[torch.Tensor]] = {name: [] for name in models}
        labels = []
        for images, y in data.batches(e.batch_size):
            labels.append(y)
            for name, (model, meta) in models.items():
                logits[name].append(batch_logits(model, meta.input, images, device, compute))
            progress.update(len(y))
        if not labels:
            raise Kd3Error(f"{data.path}: evaluation set {d.name!r} has no decodable image")
        if data.skipped:
            skipped[d.name] = data.skipped
            log.warning(f"[{NAME}] warning: {d.name}: skipped {data.skipped} undecodable image(s)")
            check_skipped(data.skipped, data.skipped + sum(len(part) for part in labels), e.max_skipped_fraction,
                          f"evaluation set {d.name!r} ({data.path})", "evaluate.max_skipped_fraction")
        y = torch.cat(labels)
        z = {name: torch.cat(parts) for name, parts in logits.items()}
        mine = [_row(d.name, "teacher", z["teacher"], y, class_names, None, e.ece_bins)]
        for name in e.students:
            row = _row(d.name, name, z[name], y, class_names, z["teacher"], e.ece_bins)
            row["delta_top1"] = row["top1"] - mine[0]["top1"]
            mine.append(row)
        rows += mine
        plots.append(reliability_plot(out.path / f"reliability_{_file_stem(d.name)}.png", d.name, mine))

    distillation: list[dict[str, Any]] = []
    if pool is not None:
        uid_to_row, z_t, pixels = pool
        shards = list_shards(run_dir / layout.DOWNLOAD)
        for name in e.students:
            model, meta = models[name]
            z_s = pool_logits(model, meta.input, meta.num_classes, shards, uid_to_row, e.batch_size,
                              compute.loader(0), device, pixels, progress=progress, compute=compute)
            distillation.append({"dataset": DISTILLATION, "model": name, "n": len(uid_to_row),
                                 **fidelity_report(z_s, z_t, None)})
    progress.close()

    datasets = [d.name for d in e.datasets]
    table, comparison = comparison_table(list(models), datasets, rows, distillation)
    atomic_write_json(out.path / "report.json", {
        "rows": rows, "distillation_rows": distillation, "comparison": comparison, "class_names": class_names,
        "ece_bins": e.ece_bins, "skipped_images": skipped, "checkpoints": {k: str(v) for k, v in paths.items()},
        "plots": [p.name for p in plots]})
    md = [f"# kd3 evaluation ({run_dir})", "",
          "Top-1 accuracy, top-1 agreement with the teacher, KL(p_T‖p_S) at τ = 1 and ECE "
          f"({e.ece_bins} bins) per dataset" + (f"; agreement / KL on {distillation[0]['n']} pool samples "
                                                 "(the distillation data)" if distillation else "") + ".", "",
          table, "", "## All metrics", "", long_table(rows + distillation), ""]
    if len(class_names) <= PER_CLASS_MD_MAX:
        for d in datasets:
            md += [f"## Per-class accuracy: {d}", "", per_class_table(d, rows), ""]
    md += ["## Reliability diagrams", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    atomic_write_text(out.path / "report.md", "\n".join(md))
    log.info(table)
    chance = 1.0 / teacher_meta.num_classes
    for r in rows:
        if r["model"] != "teacher":
            log.info(f"[{NAME}] {r['model']} on {r['dataset']}: top-1 {r['top1']:.4f} (chance {chance:.2f}), "
                     f"trails the teacher by {-r['delta_top1'] * 100:.2f} points, agreement {r['agreement']:.4f}")
    scalar = ("dataset", "model", "n", "top1", "top5", "ece", "agreement", "kl", "delta_top1")
    return {"rows": len(rows), "results": [{k: r[k] for k in scalar if k in r} for r in rows + distillation],
            "output": str(out.path / "report.md")}
