"""inspect: summary tables, plots, per-class contact sheets and an HTML report of the selection.

Reads every selection manifest of the run (``RUN/train/selection/epoch_XXX.parquet`` from KD³
training, or the folder ``train.output`` names; ``RUN/select/manifest.parquet`` from the select
stage; either is enough), ``RUN/train/metrics.jsonl``
and the download/score meta files, and the images of the shown tiles from ``RUN/download/shards``.
Writes ``RUN/inspect/``: ``index.html`` (open it from disk), ``summary.txt``, ``summary.json``,
``plots/*.png`` and ``sheets/class_KKK.png``. Settings: the ``inspect`` config section.

Where the download's URL list carries ground truth (``inspect.ground_truth_column``, e.g. the demo's
``source`` and ``demo_label``), each selection is scored against it (purity, in-domain recall, recall
per true class); without it the stage says so in one line. A class absorbing the distractors is
warned about at the top of the summary and the page, and again after the tables.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from kd3 import layout
from kd3.config import PipelineConfig, resolve_path
from kd3.inspect.manifests import SELECT_MANIFEST, TRAIN_DIR, find_manifests, listing_fingerprint
from kd3.inspect.report import build_report
from kd3.inspect.summary import warning_lines
from kd3.inspect.truth import TruthSettings, url_list_path
from kd3.runs import META_NAME, StageDir, require_complete, stage_input_fingerprint

log = logging.getLogger(__name__)

NAME = "inspect"
SUMMARY = "summary tables, plots, per-class contact sheets and an HTML report of the selection manifests"
SECTIONS = ("inspect",)
#: the stage never runs a model, so run.device is not checked for it
USES_DEVICE = False


def _train_name(cfg: PipelineConfig) -> str:
    """The train stage's folder: ``train.output`` where the config has it (variant runs), else "train"."""
    return str(getattr(cfg.train, "output", TRAIN_DIR))


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    require_complete(run_dir, layout.SCORE, NAME)  # its meta only: inspect reads manifests, not the cache
    refs = find_manifests(run_dir, _train_name(cfg))  # raises with the stages to run when there is none
    inputs = {"score": stage_input_fingerprint(run_dir, layout.SCORE)}
    if (run_dir / SELECT_MANIFEST).is_file():
        inputs["select"] = listing_fingerprint([run_dir / SELECT_MANIFEST])
    epochs = [r.path for r in refs if r.epoch is not None]
    if epochs:
        # the listing, not the train meta.json: a running train stage adds epochs before its meta changes
        metrics = run_dir / _train_name(cfg) / layout.METRICS
        inputs["train.selection"] = listing_fingerprint(epochs + ([metrics] if metrics.is_file() else []))
    if (run_dir / layout.DEDUP / META_NAME).is_file():
        inputs["dedup"] = stage_input_fingerprint(run_dir, layout.DEDUP)
    if (run_dir / "download" / META_NAME).is_file():
        inputs["download"] = stage_input_fingerprint(run_dir, "download")
    url_list = url_list_path(run_dir)
    if cfg.inspect.ground_truth_column is not None and url_list.is_file():
        inputs["ground_truth"] = listing_fingerprint([url_list])
    return inputs


def truth_settings(cfg: PipelineConfig) -> TruthSettings:
    """The ``inspect`` section's ground-truth and warning keys."""
    i = cfg.inspect
    return TruthSettings(i.ground_truth_column, i.in_domain_value, i.true_label_column, i.warn_class_share,
                         i.warn_min_samples, i.warn_keep_share)


def _eval_datasets(cfg: PipelineConfig, run_dir: Path) -> dict[str, tuple[Path, str, Optional[str]]]:
    """Where the evaluation images that dedup matched pool samples to are (evaluate.datasets)."""
    if cfg.evaluate is None:
        return {}
    return {d.name: (resolve_path(d.path, run_dir), d.format, d.label_key) for d in cfg.evaluate.datasets}


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    i = cfg.inspect
    result = build_report(out.run_dir, out.path, top_n=i.top_n, bottom_n=i.bottom_n, rejected_n=i.rejected_n,
                          max_classes=i.max_classes, thumbnail_size=i.thumbnail_size, histogram_bins=i.histogram_bins,
                          train=_train_name(cfg), truth=truth_settings(cfg), eval_datasets=_eval_datasets(cfg, out.run_dir))
    log.info(result.text)
    counts = result.counts
    for line in warning_lines(result.summary):  # again after the tables, where it cannot scroll away
        log.warning(f"[{NAME}] {line}")
    if counts["tiles_missing"]:
        log.warning(f"[{NAME}] warning: {counts['tiles_missing']} of {counts['tiles']} tiles have no image "
                    f"(not in {out.run_dir / 'download' / 'shards'} or undecodable); they are grey on the sheets")
    log.info(f"[{NAME}] report with {counts['plots']} plot(s) and {counts['sheets']} contact sheet(s); open in a browser:")
    counts["output"] = str(result.index.resolve())  # printed last by stages.base.execute
    return counts
