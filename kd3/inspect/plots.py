"""PNG plots of a run summary (matplotlib, Agg canvas, no pyplot global state).

Each function returns the written path, or None when the run has nothing to plot for it (e.g. no
τ_k in the select stage's manifest, no metrics.jsonl before training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kd3.inspect.summary import LOSS_KEYS, RunSummary
from kd3.runs import atomic_path

#: classes beyond this get lines but no legend entries (a 100-entry legend hides the plot)
LEGEND_MAX = 20


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    for ax in fig.axes:
        if ax.get_xlabel().startswith("epoch"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _classes(summary: RunSummary, max_classes: Optional[int]) -> list[int]:
    return list(range(len(summary.class_names)))[:max_classes]


def _legend(ax: Any, n: int) -> None:
    if 0 < n <= LEGEND_MAX:
        ax.legend(fontsize=7, ncol=2 if n > 10 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_selection_per_class(summary: RunSummary, path: Path, max_classes: Optional[int] = None) -> Optional[Path]:
    """Selected samples per class over epochs (a bar chart when there is a single manifest)."""
    classes = _classes(summary, max_classes)
    if not summary.manifests or not classes:
        return None
    fig = Figure(layout="constrained", figsize=(8, 4.2))
    ax = fig.add_subplot()
    colors = _colors(len(classes))
    epochs = summary.epochs
    if len(epochs) >= 2:
        x = [m.epoch for m in epochs]
        for c, k in zip(colors, classes):
            ax.plot(x, [m.selected_per_class[k] for m in epochs], marker=".", color=c, label=summary.class_names[k])
        ax.set_xlabel("epoch")
        _legend(ax, len(classes))
    else:
        final = summary.final
        ax.bar([summary.class_names[k] for k in classes], [final.selected_per_class[k] for k in classes], color=colors)
        ax.set_xlabel(f"class ({final.name})")
        if len(classes) > 20:
            ax.tick_params(axis="x", labelrotation=90, labelsize=6)
    ax.set_ylabel("selected samples")
    ax.set_title("Selection size per class")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_thresholds(summary: RunSummary, path: Path, max_classes: Optional[int] = None) -> Optional[Path]:
    """τ_k per class over epochs, with α below."""
    with_tau = [m for m in summary.epochs if m.thresholds is not None]
    classes = _classes(summary, max_classes)
    if not with_tau or not classes:
        return None
    fig = Figure(layout="constrained", figsize=(8, 5.5))
    ax, ax_alpha = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    x = [m.epoch for m in with_tau]
    for c, k in zip(_colors(len(classes)), classes):
        ax.plot(x, [m.thresholds[k] for m in with_tau], marker=".", color=c, label=summary.class_names[k])
    ax.set_ylabel("τ_k (class threshold)")
    ax.set_title("Class thresholds and α per epoch")
    ax.grid(alpha=0.3)
    _legend(ax, len(classes))
    alphas = [np.nan if m.alpha is None else m.alpha for m in with_tau]
    ax_alpha.plot(x, alphas, marker=".", color="black")
    ax_alpha.set_ylabel("α")
    ax_alpha.set_xlabel("epoch")
    ax_alpha.grid(alpha=0.3)
    return _save(fig, path)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "epoch" in r]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def plot_training(metrics: dict[int, dict[str, Any]], path: Path) -> Optional[Path]:
    """Training curves from metrics.jsonl: loss parts, agreement, α / mean weight, selection size."""
    records = [metrics[e] for e in sorted(metrics)]
    panels = [("loss", [k for k in LOSS_KEYS if _series(records, k)[0]]),
              ("agreement with the teacher", [k for k in ("train_agreement",) if _series(records, k)[0]]),
              ("α and mean weight", [k for k in ("alpha", "mean_weight") if _series(records, k)[0]]),
              ("selected samples", [k for k in ("selected", "samples") if _series(records, k)[0]])]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return None
    fig = Figure(layout="constrained", figsize=(9, 2.6 * ((len(panels) + 1) // 2) + 0.4))
    axes = np.atleast_1d(fig.subplots((len(panels) + 1) // 2, 2 if len(panels) > 1 else 1, squeeze=False)).ravel()
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            x, y = _series(records, key)
            ax.plot(x, y, marker=".", label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Training curves (metrics.jsonl)")
    return _save(fig, path)


def plot_confidence(summary: RunSummary, path: Path) -> Optional[Path]:
    """Histogram of the selection confidence of the final manifest, selected vs rejected."""
    if not summary.manifests:
        return None
    m = summary.final
    edges = np.linspace(0, 1, summary.bins + 1)
    fig = Figure(layout="constrained", figsize=(8, 3.6))
    ax = fig.add_subplot()
    width = edges[1] - edges[0]
    ax.bar(edges[:-1], m.hist_rejected, width=width, align="edge", color="#bbbbbb", label="rejected")
    ax.bar(edges[:-1], m.hist_selected, width=width, align="edge", bottom=m.hist_rejected, color="#3366cc",
           label="selected")
    ax.set_xlabel(m.conf_column)
    ax.set_ylabel("samples")
    ax.set_title(f"Confidence histogram ({m.name})")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_ground_truth(summary: RunSummary, path: Path) -> Optional[Path]:
    """Purity and in-domain recall of each selection against the URL list's ground truth.

    Lines over the training epochs, the select stage's manifest as dashed levels; bars when the
    select stage's manifest is the only one. None without ground truth.
    """
    with_truth = [m for m in summary.manifests if m.truth is not None]
    if not with_truth:
        return None
    fig = Figure(layout="constrained", figsize=(8, 3.8))
    ax = fig.add_subplot()
    series = (("purity", "#3366cc", lambda m: m.truth.purity), ("in-domain recall", "#dc7a00", lambda m: m.truth.recall))
    epochs = [m for m in with_truth if m.epoch is not None]
    select = [m for m in with_truth if m.epoch is None]
    if epochs:
        x = [m.epoch for m in epochs]
        for label, color, value in series:
            ax.plot(x, [np.nan if value(m) is None else value(m) for m in epochs], marker=".", color=color, label=label)
            for m in select:
                if value(m) is not None:
                    ax.axhline(value(m), color=color, linestyle="--", linewidth=1, label=f"{label} (select)")
        ax.set_xlabel("epoch")
    else:
        m = select[-1]
        values = [np.nan if value(m) is None else value(m) for _, _, value in series]
        ax.bar([label for label, _, _ in series], values, color=[color for _, color, _ in series])
        ax.set_xlabel(m.name)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share")
    ax.set_title("Selection purity and in-domain recall (ground truth)")
    ax.grid(alpha=0.3)
    if epochs:
        ax.legend(fontsize=8)
    return _save(fig, path)
