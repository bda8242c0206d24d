"""Benchmark tables and plots: mean ± std over seeds, per-seed values, accuracy per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from kd3.bench.spec import BenchSpec
from kd3.runs import atomic_path

def markers(section: str = "quality") -> tuple[str, str]:
    """The comment lines around a benchmark spec's section of BENCHMARKS.md."""
    return f"<!-- kd3 bench: {section} begin -->", f"<!-- kd3 bench: {section} end -->"


BEGIN, END = markers()


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _fmt(values: list[Optional[float]], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def summarise(private: str, shifted: str, cells: dict[tuple[str, int], dict[str, Any]],
              methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: lists over seeds of every reported number (failed cells are listed apart)."""
    rows: dict[str, dict[str, Any]] = {}
    for name in methods:
        done = [c for (m, _), c in sorted(cells.items()) if m == name and "last" in c]
        failed = [c for (m, _), c in sorted(cells.items()) if m == name and "error" in c]
        rows[name] = {
            "seeds": [c["seed"] for c in done],
            "private": [c["last"][private]["top1"] for c in done],
            "shifted": [c["last"][shifted]["top1"] for c in done],
            "agreement": [c["last"][private]["agreement"] for c in done],
            "kl": [c["last"][private]["kl"] for c in done],
            "ece": [c["last"][private]["ece"] for c in done],
            "averaged_private": [c["averaged"][private]["top1"] for c in done],
            "averaged_shifted": [c["averaged"][shifted]["top1"] for c in done],
            "selected": [c["mean_selected"] for c in done],
            "purity": [c["mean_purity"] for c in done],
            "seconds": [c["train_seconds"] for c in done],
            "curves": [c["private_top1_per_epoch"] for c in done],
            "purity_per_epoch": [[e["purity"] for e in c["selection"]] for c in done],
            "recall_per_epoch": [[e["in_domain_recall"] for e in c["selection"]] for c in done],
            "final_class_recall": [c["selection"][-1]["recall_per_class"] for c in done if c["selection"]],
            "failed": [f"seed {c['seed']}: {c['error']}" for c in failed],
        }
    return rows


def verdict(spec: BenchSpec, rows: dict[str, dict[str, Any]]) -> list[str]:
    """The default's margin over every data-free baseline and the share of the KD-all → ceiling gap it closes."""
    default = rows.get(spec.default_method)
    if not spec.verdict or not default or not default["private"]:
        return []
    d_mean = _mean_std(default["private"])[0]
    others = {m: _mean_std(r["private"])[0] for m, r in rows.items()
              if m != spec.default_method and r["private"] and spec.methods[m].reference is None}
    baselines = {m: v for m, v in others.items() if spec.methods[m].baseline}
    variants = {m: v for m, v in others.items() if not spec.methods[m].baseline}
    lines = []
    if baselines:
        best = max(baselines, key=baselines.get)
        margin = d_mean - baselines[best]
        lines.append(f"Default (`{spec.default_method}`) private top-1 {d_mean:.3f}; best data-free baseline "
                     f"`{best}` {baselines[best]:.3f}: margin {margin * 100:+.1f} points "
                     f"({'meets' if margin >= 0.03 else 'misses'} the ≥ 3-point target).")
    if variants:
        best = max(variants, key=variants.get)
        lines.append(f"Best tuning variant of the default (not a baseline): `{best}` {variants[best]:.3f} "
                     f"({(d_mean - variants[best]) * 100:+.1f} points for the default).")
    ceiling = [r for m, r in rows.items() if spec.methods[m].reference == "private_data" and r["private"]]
    reference = rows.get(spec.reference_method)
    if ceiling and reference and reference["private"]:
        top, base = _mean_std(ceiling[0]["private"])[0], _mean_std(reference["private"])[0]
        if top > base:
            lines.append(f"Gap from `{spec.reference_method}` ({base:.3f}) to the original-data student ({top:.3f}) "
                         f"closed by the default: {(d_mean - base) / (top - base):.0%}.")
    return lines


def table(spec: BenchSpec, rows: dict[str, dict[str, Any]]) -> str:
    ref = rows.get(spec.reference_method, {}).get("seconds") or []
    ref_time = float(np.mean(ref)) if ref else None
    head = ("| method | private top-1 | per seed | shifted top-1 | agreement | KL | ECE | "
            f"{spec.averaging_mode.upper()} private | {spec.averaging_mode.upper()} shifted | selected | purity | "
            f"time × {spec.reference_method} |")
    lines = [head, "|" + "---|" * 12]
    for name, r in rows.items():
        label = f"**{name}** (default)" if name == spec.default_method else name
        if spec.methods[name].reference:
            label += " (ceiling, not data-free)"
        if not r["private"]:
            lines.append(f"| {label} | failed: {'; '.join(r['failed']) or 'not run'} |" + " |" * 10)
            continue
        per_seed = " / ".join(f"{v:.3f}" for v in r["private"])
        time_ratio = f"{np.mean(r['seconds']) / ref_time:.2f}" if ref_time else "—"
        selected = _fmt(r["selected"], 0) if any(v is not None for v in r["selected"]) else "—"
        lines.append(f"| {label} | {_fmt(r['private'])} | {per_seed} | {_fmt(r['shifted'])} | {_fmt(r['agreement'])} | "
                     f"{_fmt(r['kl'])} | {_fmt(r['ece'])} | {_fmt(r['averaged_private'])} | "
                     f"{_fmt(r['averaged_shifted'])} | {selected} | {_fmt(r['purity'])} | {time_ratio} |")
        if r["failed"]:
            lines[-1] += f" (failed: {'; '.join(r['failed'])})"
    return "\n".join(lines)


def teachers_table(teachers: dict[str, dict[str, Any]], rows: dict[str, dict[str, Any]]) -> str:
    """One row per teacher the methods distil from: its own accuracy, the time of the stages that
    prepared it (one-off) against the mean training time of a student distilled from it."""
    lines = ["| teacher (run folder) | methods | private top-1 | shifted top-1 | preparation (s) | "
             "one distillation (s, mean) | preparation / distillation |", "|" + "---|" * 7]
    for label, t in teachers.items():
        seconds = [s for m in t["methods"] for s in rows.get(m, {}).get("seconds", [])]
        train = float(np.mean(seconds)) if seconds else None
        prep = sum(t["stage_seconds"].values())
        stages = ", ".join(f"{k} {v:.0f}" for k, v in t["stage_seconds"].items()) or "—"
        ratio = f"{prep / train:.2f}" if train and prep else "—"
        lines.append(f"| {label} | {', '.join(t['methods'])} | {t['private_top1']:.3f} | {t['shifted_top1']:.3f} | "
                     f"{stages} | {'—' if train is None else f'{train:.1f}'} | {ratio} |")
    return "\n".join(lines)


def curves_plot(path: Path, scenario: str, rows: dict[str, dict[str, Any]]) -> Path:
    """Private top-1 per epoch, mean over seeds with a min–max band, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors  # more methods than the default 10-colour cycle
    ax.set_prop_cycle(color=colors[::2] + colors[1::2])
    for name, r in rows.items():
        curves = [c for c in r["curves"] if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        arr = np.asarray([c[:length] for c in curves])
        x = np.arange(1, length + 1)
        line, = ax.plot(x, arr.mean(0), label=name)
        ax.fill_between(x, arr.min(0), arr.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("private test top-1")
    ax.set_title(f"{scenario}: accuracy per epoch (mean over seeds, band = min–max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


def write_section(path: Path, body: str, name: str = "quality") -> None:
    """Put ``body`` between the markers of section ``name`` of ``path`` (other sections are kept as they are)."""
    begin, end = markers(name)
    text = path.read_text() if path.is_file() else "# kd3 benchmarks\n"
    section = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _epoch_means(series: list[list[Optional[float]]]) -> list[Optional[float]]:
    """Mean over seeds of per-epoch values (None where no seed has a value)."""
    if not series:
        return []
    length = min(len(s) for s in series)
    out = []
    for e in range(length):
        values = [s[e] for s in series if s[e] is not None]
        out.append(float(np.mean(values)) if values else None)
    return out


def selection_tables(rows: dict[str, dict[str, Any]]) -> str:
    """Per epoch, mean over seeds: purity and in-domain recall of each method's selection; and the
    last epoch's recall per true class."""
    methods = [m for m, r in rows.items() if any(r["purity_per_epoch"])]
    if not methods:
        return ""
    epochs = min(len(_epoch_means(rows[m]["purity_per_epoch"])) for m in methods)
    head = "| method | " + " | ".join(f"e{e + 1}" for e in range(epochs)) + " |"
    out = ["Selection purity per epoch (share of in-domain images among the selected; mean over seeds) / "
           "in-domain recall (share of the pool's in-domain images selected):", "", head,
           "|" + "---|" * (epochs + 1)]
    for m in methods:
        purity = _epoch_means(rows[m]["purity_per_epoch"])
        recall = _epoch_means(rows[m]["recall_per_epoch"])
        cells = [("—" if p is None else f"{p:.2f}") + " / " + ("—" if r is None else f"{r:.2f}")
                 for p, r in zip(purity[:epochs], recall[:epochs])]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    finals = {m: rows[m]["final_class_recall"] for m in methods if rows[m]["final_class_recall"]}
    if finals:
        classes = sorted({k for per_seed in finals.values() for r in per_seed if r for k in r}, key=int)
        out += ["", "In-domain recall per true class in the last epoch (mean over seeds):", "",
                "| method | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
        for m, per_seed in finals.items():
            cells = []
            for k in classes:
                values = [r[k] for r in per_seed if r and r.get(k) is not None]
                cells.append(f"{np.mean(values):.2f}" if values else "—")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)
