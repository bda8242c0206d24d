"""Summaries of selection manifests: counts per class, τ_k, α, churn and confidence histograms.

One streaming pass per manifest over a handful of columns (uid, selected, label, confidence,
class_threshold, alpha, weight). For churn, only the selected uids of the current and the previous
epoch stay in memory, as sorted 64-bit hashes (8 bytes a sample) rather than strings or sets.

Where the URL list carries ground truth (:mod:`.truth`), the same pass joins each batch with it
on uid hashes: purity, in-domain recall, recall per true class, and the selected distractors per
pseudo-class, which feed the warning that one class absorbs the distractors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd3.errors import Kd3Error
from kd3.inspect.manifests import (TRAIN_DIR, ManifestRef, class_names as read_class_names, columns_of,
                                   find_manifests, iter_batches, prediction_columns, uid_hashes)
from kd3.inspect.truth import DEFAULT_TRUTH, GroundTruth, TruthSettings, load_ground_truth
from kd3 import layout
from kd3.progress import Progress
from kd3.runs import read_jsonl

#: training-metric keys shown in tables and plots when metrics.jsonl has them
LOSS_KEYS = ("loss", "loss_fa", "loss_con_s", "loss_con_t")


@dataclass
class TruthStats:
    """A manifest against the URL list's ground truth; per-class arrays are indexed by class."""

    #: manifest rows whose uid the URL list has (the others have no ground truth and are left out)
    known: int = 0
    #: of those, in-domain
    in_domain: int = 0
    selected_known: int = 0
    selected_in_domain: int = 0
    #: selected samples that are not in-domain, by the manifest's label (combined, else teacher)
    distractors_per_class: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: in-domain rows / selected in-domain rows by true class; None without a true-label column
    true_per_class: Optional[np.ndarray] = None
    true_selected_per_class: Optional[np.ndarray] = None

    @property
    def distractors(self) -> int:
        """Selected samples whose ground truth is not in-domain."""
        return self.selected_known - self.selected_in_domain

    @property
    def purity(self) -> Optional[float]:
        """Share of in-domain samples among the selected (those with ground truth)."""
        return self.selected_in_domain / self.selected_known if self.selected_known else None

    @property
    def recall(self) -> Optional[float]:
        """Share of the manifest's in-domain samples that were selected."""
        return self.selected_in_domain / self.in_domain if self.in_domain else None

    @property
    def class_recall(self) -> Optional[np.ndarray]:
        """Per true class: share of its in-domain samples that were selected (NaN: none in the manifest)."""
        if self.true_per_class is None or self.true_selected_per_class is None:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.true_per_class > 0,
                            self.true_selected_per_class / np.maximum(self.true_per_class, 1), np.nan)

    def to_dict(self, names: Sequence[str], true_names: Sequence[str], rows: int) -> dict[str, Any]:
        def per_class(values: Optional[np.ndarray], labels: Sequence[str]) -> Optional[dict[str, Any]]:
            return None if values is None else {labels[k]: _plain(v) for k, v in enumerate(values)}

        return {"rows_with_truth": self.known, "rows_without_truth": rows - self.known,
                "in_domain": self.in_domain, "selected_with_truth": self.selected_known,
                "selected_in_domain": self.selected_in_domain, "selected_distractors": self.distractors,
                "purity": self.purity, "in_domain_recall": self.recall,
                "distractors_per_class": per_class(self.distractors_per_class, names),
                "in_domain_per_true_class": per_class(self.true_per_class, true_names),
                "selected_per_true_class": per_class(self.true_selected_per_class, true_names),
                "recall_per_true_class": per_class(self.class_recall, true_names)}


@dataclass
class ManifestStats:
    """What one manifest says about its selection; arrays are indexed by class."""

    name: str
    short: str
    path: str
    epoch: Optional[int]
    label_column: str
    conf_column: str
    rows: int = 0
    selected: int = 0
    pool_per_class: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    selected_per_class: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: τ of each class (mean of class_threshold over that class's rows); None without the column
    thresholds: Optional[np.ndarray] = None
    alpha: Optional[float] = None
    #: rows with a finite feature-alignment weight (trained that epoch); None without the column
    trained: Optional[int] = None
    mean_weight: Optional[float] = None
    hist_selected: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    hist_rejected: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: samples that entered / left the selection since the previous epoch (None for the first)
    churn_in: Optional[int] = None
    churn_out: Optional[int] = None
    #: the manifest against the URL list's ground truth; None without ground truth
    truth: Optional[TruthStats] = None

    @property
    def dominant_class(self) -> Optional[int]:
        return int(np.argmax(self.selected_per_class)) if self.selected else None

    def to_dict(self, names: Sequence[str], true_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
        def per_class(values: Optional[np.ndarray]) -> Optional[dict[str, Any]]:
            if values is None:
                return None
            return {names[k]: _plain(v) for k, v in enumerate(values)}

        dominant = self.dominant_class
        return {
            "name": self.name, "path": self.path, "epoch": self.epoch, "label_column": self.label_column,
            "conf_column": self.conf_column, "rows": self.rows, "selected": self.selected,
            "alpha": self.alpha, "trained": self.trained, "mean_weight": self.mean_weight,
            "churn_in": self.churn_in, "churn_out": self.churn_out,
            "dominant_class": None if dominant is None else names[dominant],
            "pool_per_class": per_class(self.pool_per_class), "selected_per_class": per_class(self.selected_per_class),
            "class_thresholds": per_class(self.thresholds),
            "hist_selected": self.hist_selected.tolist(), "hist_rejected": self.hist_rejected.tolist(),
            "ground_truth": None if self.truth is None else self.truth.to_dict(names, true_names or names, self.rows),
        }


def _plain(value: Any) -> Any:
    """numpy scalar → JSON value (NaN → None)."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def _grow(values: np.ndarray, size: int) -> np.ndarray:
    if len(values) >= size:
        return values
    return np.concatenate([values, np.zeros(size - len(values), values.dtype)])


def _numpy(column: pa.Array, fill: Any, dtype: Any) -> np.ndarray:
    return pc.fill_null(column, fill).to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def summarize_manifest(ref: ManifestRef, num_classes: Optional[int] = None, bins: int = 20,
                       by: Optional[str] = None, truth: Optional[GroundTruth] = None
                       ) -> tuple[ManifestStats, np.ndarray]:
    """One streaming pass over a manifest → its stats and the sorted hashes of the uids it selected.

    With ``truth``, every batch's uids are also looked up in the URL list's ground truth
    (``stats.truth``).
    """
    label_col, conf_col = prediction_columns(ref.path, by)
    present = set(columns_of(ref.path))
    extra = [c for c in ("class_threshold", "alpha", "weight") if c in present]
    columns = ["uid", "selected", label_col, conf_col, *extra]
    size = num_classes or 0
    stats = ManifestStats(ref.name, ref.short, str(ref.path), ref.epoch, label_col, conf_col,
                          pool_per_class=np.zeros(size, np.int64), selected_per_class=np.zeros(size, np.int64),
                          hist_selected=np.zeros(bins, np.int64), hist_rejected=np.zeros(bins, np.int64))
    tau_sum, tau_n = np.zeros(size), np.zeros(size, np.int64)
    alpha_sum, alpha_n, weight_sum, weight_n = 0.0, 0, 0.0, 0
    chosen: list[np.ndarray] = []
    gt: Optional[TruthStats] = None
    if truth is not None:
        gt = TruthStats(distractors_per_class=np.zeros(size, np.int64))
        if truth.true_label is not None:
            gt.true_per_class = np.zeros(truth.num_classes, np.int64)
            gt.true_selected_per_class = np.zeros(truth.num_classes, np.int64)
    for batch in iter_batches(ref.path, columns):
        labels = _numpy(batch.column(label_col), -1, np.int64)
        selected = _numpy(batch.column("selected"), False, bool)
        conf = _numpy(batch.column(conf_col), np.nan, np.float64)
        valid = labels >= 0  # a null label cannot be counted in any class
        top = int(labels.max(initial=-1)) + 1
        if num_classes is not None and top > num_classes:
            raise Kd3Error(f"{ref.path}: {label_col} {top - 1} is outside the {num_classes} classes of "
                           "score/meta.json; is this manifest from another run?")
        if top > size:
            size = top
            stats.pool_per_class, stats.selected_per_class = _grow(stats.pool_per_class, size), \
                _grow(stats.selected_per_class, size)
            tau_sum, tau_n = _grow(tau_sum, size), _grow(tau_n, size)
            if gt is not None:
                gt.distractors_per_class = _grow(gt.distractors_per_class, size)
        stats.rows += len(labels)
        stats.selected += int(selected.sum())
        stats.pool_per_class += np.bincount(labels[valid], minlength=size)
        stats.selected_per_class += np.bincount(labels[valid & selected], minlength=size)
        finite = np.isfinite(conf)
        idx = np.minimum((np.clip(conf[finite], 0.0, 1.0) * bins).astype(np.int64), bins - 1)
        stats.hist_selected += np.bincount(idx[selected[finite]], minlength=bins)
        stats.hist_rejected += np.bincount(idx[~selected[finite]], minlength=bins)
        if "class_threshold" in extra:
            tau = _numpy(batch.column("class_threshold"), np.nan, np.float64)
            ok = valid & np.isfinite(tau)
            tau_sum += np.bincount(labels[ok], weights=tau[ok], minlength=size)
            tau_n += np.bincount(labels[ok], minlength=size)
        if "alpha" in extra:
            alpha = _numpy(batch.column("alpha"), np.nan, np.float64)
            alpha_sum, alpha_n = alpha_sum + float(np.nansum(alpha)), alpha_n + int(np.isfinite(alpha).sum())
        if "weight" in extra:
            weight = _numpy(batch.column("weight"), np.nan, np.float64)
            ok = np.isfinite(weight)
            weight_sum, weight_n = weight_sum + float(weight[ok].sum()), weight_n + int(ok.sum())
        if gt is None:
            chosen.append(uid_hashes(batch.column("uid").filter(pa.array(selected))))
            continue
        hashes = uid_hashes(batch.column("uid"))
        chosen.append(hashes[selected])
        found, in_domain, true = truth.lookup(hashes)
        gt.known += int(found.sum())
        gt.in_domain += int(in_domain.sum())
        gt.selected_known += int((found & selected).sum())
        gt.selected_in_domain += int((in_domain & selected).sum())
        gt.distractors_per_class += np.bincount(labels[valid & selected & found & ~in_domain], minlength=size)
        if true is not None:
            ok = true >= 0
            gt.true_per_class += np.bincount(true[ok], minlength=truth.num_classes)
            gt.true_selected_per_class += np.bincount(true[ok & selected], minlength=truth.num_classes)
    if num_classes is not None:
        stats.pool_per_class, stats.selected_per_class = _grow(stats.pool_per_class, num_classes), \
            _grow(stats.selected_per_class, num_classes)
        tau_sum, tau_n = _grow(tau_sum, num_classes), _grow(tau_n, num_classes)
        if gt is not None:
            gt.distractors_per_class = _grow(gt.distractors_per_class, num_classes)
    stats.truth = gt
    if "class_threshold" in extra:
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.thresholds = np.where(tau_n > 0, tau_sum / np.maximum(tau_n, 1), np.nan)
    if "alpha" in extra:
        stats.alpha = alpha_sum / alpha_n if alpha_n else None
    if "weight" in extra:
        stats.trained = weight_n
        stats.mean_weight = weight_sum / weight_n if weight_n else None
    return stats, np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def churn(previous: np.ndarray, current: np.ndarray) -> tuple[int, int]:
    """(entered, left) between two epochs' sorted, unique selected-uid hashes."""
    kept = len(np.intersect1d(previous, current, assume_unique=True))
    return len(current) - kept, len(previous) - kept


@dataclass(frozen=True)
class Absorption:
    """One class holding most of a manifest's selected distractors (or, without ground truth, of its selection)."""

    manifest: str
    class_index: int
    count: int
    total: int
    #: "distractors": selected samples whose ground truth is not in-domain; "selection": all selected samples
    basis: str
    label_column: str

    @property
    def share(self) -> float:
        return self.count / self.total

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        return {"manifest": self.manifest, "class": names[self.class_index], "class_index": self.class_index,
                "count": self.count, "total": self.total, "share": self.share, "basis": self.basis,
                "label_column": self.label_column}


def find_absorption(stats: ManifestStats, settings: TruthSettings = DEFAULT_TRUTH) -> Optional[Absorption]:
    """The class absorbing the distractors in one manifest, or None.

    With ground truth: one pseudo-class (the manifest's label column: combined, else teacher) holds
    more than ``warn_share`` of the selected samples that are not in-domain. Without it: one class
    holds more than ``warn_share`` of the selected samples. Either way only when at least
    ``warn_min_samples`` samples are counted.
    """
    if stats.truth is not None:
        counts, basis = stats.truth.distractors_per_class, "distractors"
    else:
        counts, basis = stats.selected_per_class, "selection"
    total = int(counts.sum())
    if not total or total < settings.warn_min_samples:
        return None
    k = int(np.argmax(counts))
    if counts[k] / total <= settings.warn_share:
        return None
    return Absorption(stats.name, k, int(counts[k]), total, basis, stats.label_column)


@dataclass
class RunSummary:
    """Everything the tables, plots and report show about a run (or a list of manifests)."""

    class_names: list[str]
    manifests: list[ManifestStats]
    bins: int
    run_dir: Optional[str] = None
    #: urls, downloaded, failed, failures_by_reason, scored (whatever the run's meta files say)
    pool: dict[str, Any] = field(default_factory=dict)
    #: training metrics by epoch (metrics.jsonl)
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: the ground truth used (path, column, value, counts), None when there was none
    truth: Optional[dict[str, Any]] = None
    #: one line saying why there is no (or only partial) ground truth; None when there is nothing to say
    truth_note: Optional[str] = None
    truth_settings: TruthSettings = DEFAULT_TRUTH
    #: manifests where one class absorbs the distractors (or the selection), in manifest order
    absorptions: list[Absorption] = field(default_factory=list)

    @property
    def true_class_names(self) -> list[str]:
        """Names of the true classes: the teacher's, then indices for labels beyond them."""
        size = max([len(m.truth.true_per_class) for m in self.manifests
                    if m.truth is not None and m.truth.true_per_class is not None] + [0])
        return self.class_names + [str(k) for k in range(len(self.class_names), size)]

    @property
    def has_truth(self) -> bool:
        return any(m.truth is not None for m in self.manifests)

    @property
    def epochs(self) -> list[ManifestStats]:
        return [m for m in self.manifests if m.epoch is not None]

    @property
    def final(self) -> ManifestStats:
        """The selection a user would take away: the last epoch, else the select stage's."""
        return (self.epochs or self.manifests)[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "class_names": self.class_names, "pool": self.pool,
                "histogram_edges": np.linspace(0, 1, self.bins + 1).round(6).tolist(),
                "manifests": [m.to_dict(self.class_names, self.true_class_names) for m in self.manifests],
                "metrics": [self.metrics[e] for e in sorted(self.metrics)],
                "ground_truth": self.truth or {"available": False, "note": self.truth_note},
                "ground_truth_note": self.truth_note,
                "warning_thresholds": {"share": self.truth_settings.warn_share,
                                       "min_samples": self.truth_settings.warn_min_samples},
                "warnings": [a.to_dict(self.class_names) for a in self.absorptions],
                "selection_warnings": selection_lines(self),
                "warning_text": warning_lines(self, limit=None)}


def pool_info(run_dir: Path) -> dict[str, Any]:
    """Pool size and download failures by reason, from the download and score stages' meta.json."""
    info: dict[str, Any] = {}
    for stage, keys in (("download", ("urls", "ok", "failed", "failures_by_reason")), ("score", ("scored",))):
        meta_path = Path(run_dir) / stage / "meta.json"
        if not meta_path.is_file():
            continue
        try:
            counts = json.loads(meta_path.read_text()).get("counts", {})
        except json.JSONDecodeError:
            continue  # a torn meta.json only costs the pool table a row
        info.update({k: counts[k] for k in keys if k in counts})
    return info


def read_metrics(run_dir: Path, train: str = TRAIN_DIR) -> dict[int, dict[str, Any]]:
    """metrics.jsonl by epoch (the train stage's epoch numbers match the manifests' file names)."""
    return {int(r["epoch"]): r for r in read_jsonl(Path(run_dir) / train / layout.METRICS) if "epoch" in r}


def summarize(refs: Sequence[ManifestRef], class_names: Optional[Sequence[str]] = None, bins: int = 20,
              run_dir: Optional[Path] = None, by: Optional[str] = None, train: str = TRAIN_DIR,
              truth: TruthSettings = DEFAULT_TRUTH) -> RunSummary:
    """Stats for each manifest, churn between consecutive training epochs, and the run's pool/metrics.

    With a ``run_dir`` whose URL list carries the ground truth that ``truth`` names, each manifest
    is also scored against it; every manifest is checked for a class absorbing the distractors.
    """
    stats: list[ManifestStats] = []
    previous: Optional[np.ndarray] = None
    num_classes = len(class_names) if class_names else None
    ground_truth, note = load_ground_truth(run_dir, truth, class_names)
    for ref in Progress(refs, "[inspect] summarising manifests", unit="manifest"):
        item, uids = summarize_manifest(ref, num_classes, bins, by, ground_truth)
        if ref.epoch is not None:
            if previous is not None:
                item.churn_in, item.churn_out = churn(previous, uids)
            previous = uids  # only the latest epoch's uids are kept
        stats.append(item)
    size = max([len(s.pool_per_class) for s in stats] + [num_classes or 0])
    for item in stats:  # a later manifest may have seen a higher label than an earlier one
        item.pool_per_class, item.selected_per_class = _grow(item.pool_per_class, size), \
            _grow(item.selected_per_class, size)
        if item.thresholds is not None and len(item.thresholds) < size:
            item.thresholds = np.concatenate([item.thresholds, np.full(size - len(item.thresholds), np.nan)])
        if item.truth is not None:
            item.truth.distractors_per_class = _grow(item.truth.distractors_per_class, size)
    names = list(class_names) if class_names else [str(k) for k in range(size)]
    summary = RunSummary(names, stats, bins, str(run_dir) if run_dir else None,
                         truth=ground_truth.info() if ground_truth is not None else None, truth_note=note,
                         truth_settings=truth)
    summary.absorptions = [a for a in (find_absorption(m, truth) for m in stats) if a is not None]
    if run_dir is not None:
        summary.pool = pool_info(run_dir)
        summary.metrics = read_metrics(run_dir, train)
    return summary


def summarize_run(run_dir: Path, bins: int = 20, refs: Optional[Sequence[ManifestRef]] = None,
                  train: str = TRAIN_DIR, truth: TruthSettings = DEFAULT_TRUTH) -> RunSummary:
    """The whole run: every manifest (or ``refs``), with class names, pool, training metrics and ground truth."""
    refs = refs if refs is not None else find_manifests(run_dir, train)
    return summarize(refs, read_class_names(run_dir), bins, run_dir, train=train, truth=truth)


# ------------------------------------------------------------------------------------------- tables
@dataclass
class Table:
    """A small table rendered as aligned text (terminal) or HTML (report) from the same cells."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    anchor: str = ""

    def drop_empty_columns(self) -> "Table":
        """Remove columns that are "—" in every row (e.g. α for the select stage's manifest)."""
        keep = [0] + [j for j in range(1, len(self.header)) if any(r[j] != "—" for r in self.rows)]
        self.header = [self.header[j] for j in keep]
        self.rows = [[r[j] for j in keep] for r in self.rows]
        return self

    def to_text(self, max_cols: int = 14, max_rows: int = 40) -> str:
        """Aligned text; wide tables keep the first, last and evenly spaced columns between.
        (Own code, not tabulate: the column thinning and the notes are what it adds.)"""
        cols = list(range(len(self.header)))
        if len(cols) > max_cols:
            keep = sorted({0, 1, *np.linspace(1, len(cols) - 1, max_cols - 1).round().astype(int).tolist()})
            cols = keep
        rows = self.rows if len(self.rows) <= max_rows else self.rows[:max_rows]
        cells = [[self.header[j] for j in cols]] + [[r[j] for j in cols] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
        # numbers right-aligned (header too), words and bars left-aligned
        right = [i > 0 and all(_numeric(row[i]) for row in cells[1:]) for i in range(len(cols))]
        lines = [self.title]
        for n, row in enumerate(cells):
            lines.append(("  " + "  ".join(c.rjust(w) if right[i] else c.ljust(w)
                                          for i, (c, w) in enumerate(zip(row, widths)))).rstrip())
            if n == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        hidden = []
        if len(cols) < len(self.header):
            hidden.append(f"{len(self.header) - len(cols)} column(s)")
        if len(rows) < len(self.rows):
            hidden.append(f"{len(self.rows) - len(rows)} row(s)")
        if hidden:
            lines.append(f"  … {' and '.join(hidden)} not shown here (see summary.json / index.html)")
        if self.note:
            lines.append(f"  {self.note}")
        return "\n".join(lines)


def _numeric(text: str) -> bool:
    """Right-align numbers (and their "—" placeholder), left-align words and bars."""
    try:
        float(text)
        return True
    except ValueError:
        return text == "—"


def _f(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _i(value: Optional[int]) -> str:
    return "—" if value is None else str(int(value))


def pool_table(summary: RunSummary) -> Table:
    p = summary.pool
    rows = []
    if "urls" in p:
        rows.append(["URLs in the list", _i(p["urls"])])
    if "ok" in p:
        rows.append(["downloaded", _i(p["ok"])])
    if "failed" in p:
        rows.append(["failed", _i(p["failed"])])
        for reason, n in sorted(p.get("failures_by_reason", {}).items(), key=lambda kv: -kv[1]):
            short = reason if len(reason) <= 40 else reason[:39] + "…"
            rows.append([f"  failed: {short}", _i(n)])
    if "scored" in p:
        rows.append(["scored by the teacher", _i(p["scored"])])
    if summary.manifests:
        rows.append(["rows in the final manifest", _i(summary.final.rows)])
    return Table("Pool", ["", "samples"], rows, anchor="pool")


def overview_table(summary: RunSummary) -> Table:
    rows = []
    for m in summary.manifests:
        record = summary.metrics.get(m.epoch, {}) if m.epoch is not None else {}
        share = m.selected / m.rows if m.rows else None
        taus = m.thresholds[np.isfinite(m.thresholds)] if m.thresholds is not None else np.zeros(0)
        dominant = m.dominant_class
        rows.append([m.name, _i(m.rows), _i(m.selected), _f(share), _f(m.alpha),
                     _f(float(taus.mean())) if len(taus) else "—", _i(m.churn_in), _i(m.churn_out),
                     _i(m.trained), _f(m.mean_weight), "—" if dominant is None else summary.class_names[dominant],
                     _f(record.get("loss"), 4), _f(record.get("train_agreement"))])
    header = ["manifest", "rows", "selected", "share", "α", "mean τ", "entered", "left", "trained",
              "mean weight", "dominant", "loss", "agreement"]
    note = "entered/left: selection churn since the previous epoch; τ: per-class threshold"
    return Table("Selection per manifest", header, rows, anchor="overview", note=note).drop_empty_columns()


def per_class_table(summary: RunSummary, max_classes: Optional[int] = None) -> Table:
    final = summary.final
    header = ["class", "pool"] + [m.short for m in summary.manifests]
    rows = []
    for k, name in enumerate(summary.class_names[:max_classes]):
        rows.append([name, _i(final.pool_per_class[k])] + [_i(m.selected_per_class[k]) for m in summary.manifests])
    return Table("Selected samples per class", header, rows, anchor="per-class",
                 note=f"pool: samples the {final.name} manifest labels with that class ({final.label_column})")


def threshold_table(summary: RunSummary, max_classes: Optional[int] = None) -> Optional[Table]:
    with_tau = [m for m in summary.manifests if m.thresholds is not None]
    if not with_tau:
        return None
    rows = [["α"] + [_f(m.alpha) for m in with_tau]]
    for k, name in enumerate(summary.class_names[:max_classes]):
        rows.append([f"τ {name}"] + [_f(float(m.thresholds[k])) for m in with_tau])
    return Table("Class thresholds τ_k and α per epoch", ["", *[m.short for m in with_tau]], rows, anchor="thresholds",
                 note="— : no sample had that class as its label in that epoch")


def histogram_table(summary: RunSummary, manifest: Optional[ManifestStats] = None) -> Table:
    m = manifest or summary.final
    edges = np.linspace(0, 1, summary.bins + 1)
    peak = max(int(m.hist_selected.max(initial=0)), int(m.hist_rejected.max(initial=0)), 1)
    filled = np.flatnonzero(m.hist_selected + m.hist_rejected)
    first, last = (int(filled[0]), int(filled[-1])) if len(filled) else (0, summary.bins - 1)
    rows = []
    for b in range(first, last + 1):  # empty bins at either end say nothing
        sel, rej = int(m.hist_selected[b]), int(m.hist_rejected[b])
        bar = "#" * round(20 * sel / peak) + "." * round(20 * rej / peak)
        rows.append([f"{edges[b]:.2f}–{edges[b + 1]:.2f}", str(sel), str(rej), bar])
    return Table(f"Confidence histogram ({m.name}, {m.conf_column})", ["confidence", "selected", "rejected", ""],
                 rows, anchor="confidence",
                 note="bar: # selected, . rejected (scaled to the largest bin); empty bins at the ends left out")


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def ground_truth_table(summary: RunSummary) -> Optional[Table]:
    """Purity, in-domain recall and the class holding most selected distractors, per manifest."""
    with_truth = [m for m in summary.manifests if m.truth is not None]
    if not with_truth or summary.truth is None:
        return None
    unmatched = any(m.rows > m.truth.known for m in with_truth)
    rows = []
    for m in with_truth:
        t = m.truth
        labelled = int(t.distractors_per_class.sum())
        top = int(np.argmax(t.distractors_per_class)) if labelled else None
        row = [m.name, _i(t.selected_known), _i(t.selected_in_domain), _i(t.distractors), _f(t.purity), _f(t.recall),
               "—" if top is None else summary.class_names[top],
               "—" if top is None else _f(t.distractors_per_class[top] / labelled)]
        rows.append(row + ([_i(m.rows - t.known)] if unmatched else []))
    header = ["manifest", "selected", "in-domain sel.", "distractors sel.", "purity", "in-domain recall",
              "top distractor class", "its share"] + (["no truth"] if unmatched else [])
    g = summary.truth
    note = (f"in-domain: {g['column']} == {g['in_domain_value']!r} ({g['in_domain_urls']} of {g['urls']} URLs in "
            f"{g['path']}; never given to a method); purity = in-domain share of the selected; in-domain recall = "
            "share of the manifest's in-domain samples selected; top distractor class = the label holding most "
            "selected non-in-domain samples"
            + ("; no truth = manifest rows the URL list lacks (left out of every number here)" if unmatched else ""))
    return Table("Ground truth per manifest", header, rows, anchor="ground-truth", note=note)


def class_recall_table(summary: RunSummary, max_classes: Optional[int] = None) -> Optional[Table]:
    """Per true class: the share of its in-domain samples each manifest selected."""
    with_truth = [m for m in summary.manifests if m.truth is not None and m.truth.class_recall is not None]
    if not with_truth:
        return None
    final = with_truth[-1]
    rows = []
    for k, name in enumerate(summary.true_class_names[:max_classes]):
        rows.append([name, _i(final.truth.true_per_class[k])]
                    + [_f(float(m.truth.class_recall[k])) for m in with_truth])
    column = (summary.truth or {}).get("true_label_column")
    return Table("In-domain recall per true class", ["class", "in-domain", *[m.short for m in with_truth]], rows,
                 anchor="class-recall",
                 note=f"share of the in-domain samples of each true class ({column}) that the manifest selected; "
                      f"in-domain: those samples in the {final.name} manifest; — : none in the manifest")


def absorption_lines(summary: RunSummary, limit: Optional[int] = 5) -> list[str]:
    """A headline and one line per manifest where one class absorbs the distractors (final first); [] if none."""
    found = summary.absorptions
    if not found:
        return []
    share = _pct(summary.truth_settings.warn_share)
    if found[0].basis == "distractors":
        g = summary.truth or {}
        head = (f"WARNING: one class absorbs the distractors in {len(found)} of {len(summary.manifests)} manifest(s): "
                f"it holds more than {share} of the selected samples whose ground truth is not in-domain "
                f"({g.get('column')} != {g.get('in_domain_value')!r})")
        what = "of the selected distractors"
    else:
        head = (f"WARNING: one class holds more than {share} of the selection in {len(found)} of "
                f"{len(summary.manifests)} manifest(s); without ground truth this is the sign of a class "
                "absorbing the distractors (check its contact sheet)")
        what = "of the selected samples"
    final = summary.final.name
    ordered = sorted(found, key=lambda a: a.manifest != final)  # the final selection first, then manifest order
    shown = ordered if limit is None else ordered[:limit]
    lines = [head]
    for a in shown:
        tag = " (final)" if a.manifest == final else ""
        lines.append(f"  {a.manifest}{tag}: class {summary.class_names[a.class_index]!r} ({a.label_column}) holds "
                     f"{_pct(a.share)} {what} ({a.count} of {a.total})")
    if len(shown) < len(ordered):
        lines.append(f"  … and {len(ordered) - len(shown)} more manifest(s) (summary.json: warnings)")
    return lines


def selection_lines(summary: RunSummary) -> list[str]:
    """Headlines for two signs of a selection that does not do its job: one class holding more than
    ``warn_share`` of an epoch's confident samples (the train metrics' ``confident_per_class``), and a
    final selection keeping at least ``warn_keep_share`` of the pool; [] if neither."""
    settings, lines = summary.truth_settings, []
    flagged = []
    for m in summary.epochs:
        confident = summary.metrics.get(m.epoch, {}).get("confident_per_class") or {}
        total = sum(confident.values())
        if total and total >= settings.warn_min_samples:
            name, top = max(confident.items(), key=lambda kv: kv[1])
            if top / total > settings.warn_share:
                flagged.append((m.name, name, top, total))
    if flagged:
        last, name, top, total = flagged[-1]
        lines.append(f"WARNING: one class holds more than {_pct(settings.warn_share)} of the confident samples in "
                     f"{len(flagged)} of {len(summary.epochs)} epoch(s); last {last}: class {name!r}, {top} of {total}; "
                     "the other classes' thresholds fall towards 0 (see selectors.kd3_dynamic.threshold_floor / "
                     "max_class_share)")
    final = summary.final
    if final.rows and final.rows >= settings.warn_min_samples and final.selected / final.rows >= settings.warn_keep_share:
        lines.append(f"WARNING: the final selection ({final.name}) keeps {_pct(final.selected / final.rows)} of the pool "
                     f"({final.selected} of {final.rows}): it hardly filters anything (expected only with the `all` "
                     "selector; otherwise raise the selector's threshold)")
    return lines


def warning_lines(summary: RunSummary, limit: Optional[int] = 5) -> list[str]:
    """Every warning: the absorbed distractors (a headline, then a line per manifest), then the selection's
    own (one headline each); [] if none. A headline starts with "WARNING", the lines under it with spaces."""
    return absorption_lines(summary, limit) + selection_lines(summary)


def tables(summary: RunSummary, max_classes: Optional[int] = None) -> list[Table]:
    """The report's tables, in order; the pool table only when the run's meta files say something."""
    out = [pool_table(summary)] if summary.pool else []
    out.append(overview_table(summary))
    out += [t for t in (ground_truth_table(summary),) if t is not None]
    out.append(per_class_table(summary, max_classes))
    out += [t for t in (class_recall_table(summary, max_classes),) if t is not None]
    tau = threshold_table(summary, max_classes)
    if tau is not None:
        out.append(tau)
    out.append(histogram_table(summary))
    return out


def format_summary(summary: RunSummary, max_classes: Optional[int] = None) -> str:
    """The compact text version printed by ``kd3 inspect`` and ``kd3 query --summary``.

    Warnings (a class absorbing the distractors) come first, the ground-truth note (why there is
    none) last.
    """
    warnings = warning_lines(summary)
    parts = ["\n".join(warnings)] if warnings else []
    parts += [t.to_text() for t in tables(summary, max_classes)]
    if summary.truth_note:
        parts.append(summary.truth_note)
    return "\n\n".join(parts)
