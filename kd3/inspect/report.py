"""The ``RUN/inspect/`` folder: summary files, plots, contact sheets and a static ``index.html``.

The page is plain HTML with inline CSS: no script, no server, no external URL (sample URLs are
shown as text, never linked), so it opens from disk and can be copied as a folder. Every link is
relative and is checked to exist before the build reports success.

Built with f-strings rather than a template engine (jinja2): the page is a few short functions in
which every value passes through ``_esc``; a template would add a package-data file and a dependency
for no fewer lines.
"""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import quote, unquote, urlsplit

from kd3 import __version__
from kd3.errors import Kd3Error
from kd3.inspect.dedup import DedupView, dedup_view
from kd3.inspect.manifests import TRAIN_DIR, ManifestRef, find_manifests
from kd3.inspect.sheets import SECTIONS, Sheet, build_sheets
from kd3.inspect.summary import RunSummary, Table, format_summary, selection_lines, summarize_run, tables, warning_lines
from kd3.inspect.truth import DEFAULT_TRUTH, TruthSettings
from kd3.progress import Progress
from kd3.runs import atomic_write_json, atomic_write_text

INDEX = "index.html"
PLOTS_DIR = "plots"
SHEETS_DIR = "sheets"

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 0 auto; max-width: 1150px;
       padding: 0 16px 40px; color: #222; }
h1 { margin: 18px 0 4px; } h2 { margin-top: 28px; border-bottom: 1px solid #ddd; } h3 { margin: 18px 0 6px; }
nav a { margin-right: 12px; } .meta { color: #666; } code { background: #f4f4f4; padding: 0 3px; }
table { border-collapse: collapse; margin: 6px 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 2px 7px; } th { background: #f3f3f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } .note { color: #666; font-size: 12px; }
.scroll { overflow-x: auto; } figure { margin: 10px 0; } img { max-width: 100%; border: 1px solid #eee; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 8px; }
figcaption { color: #666; font-size: 12px; }
details { margin: 4px 0 12px; } td.url { font-family: monospace; font-size: 11px; word-break: break-all; }
.warning { background: #fff3cd; border: 1px solid #e0b000; border-left: 6px solid #e0a000; padding: 6px 12px;
           margin: 12px 0; } .warning ul { margin: 4px 0; }
"""
#: tables shown above the plots (the rest follow them)
_HEAD_TABLES = ("pool", "overview", "ground-truth")


@dataclass
class InspectResult:
    index: Path
    summary: RunSummary
    text: str
    plots: dict[str, Path] = field(default_factory=dict)
    sheets: list[Sheet] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, Any]:
        final = self.summary.final
        return {"manifests": len(self.summary.manifests), "classes": len(self.summary.class_names),
                "final_manifest": final.name, "final_rows": final.rows, "final_selected": final.selected,
                "plots": len(self.plots), "sheets": sum(s.path is not None for s in self.sheets),
                "tiles": sum(len(s.tiles) for s in self.sheets),
                "tiles_missing": sum(t.status != "ok" for s in self.sheets for t in s.tiles),
                "ground_truth": self.summary.truth is not None, "warnings": len(self.summary.absorptions),
                "selection_warnings": len(selection_lines(self.summary)),
                "index": str(self.index)}


# ----------------------------------------------------------------------------------------- HTML
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(out_dir: Path, path: Path) -> str:
    return quote(Path(path).relative_to(out_dir).as_posix())


def _is_number(text: str) -> bool:
    try:
        float(text.replace("—", "nan"))
        return True
    except ValueError:
        return False


def table_html(table: Table) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in table.header)
    body = []
    for row in table.rows:
        cells = "".join(f'<td class="num">{_esc(c)}</td>' if i and _is_number(c) else f"<td>{_esc(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    note = f'<p class="note">{_esc(table.note)}</p>' if table.note else ""
    anchor = f' id="{_esc(table.anchor)}"' if table.anchor else ""
    return (f"<section{anchor}><h2>{_esc(table.title)}</h2><div class=\"scroll\"><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>{note}</section>")


def _sheet_html(sheet: Sheet, out_dir: Path) -> str:
    parts = [f'<section class="sheet" id="class-{sheet.class_index}">'
             f"<h3>class {_esc(sheet.class_name)} — {sheet.selected} selected</h3>"]
    if sheet.path is None:
        parts.append('<p class="note">no sample of this class in the manifest</p></section>')
        return "".join(parts)
    href = _href(out_dir, sheet.path)
    parts.append(f'<a href="{href}"><img src="{href}" alt="contact sheet for class {_esc(sheet.class_name)}"></a>')
    counts = ", ".join(f"{sheet.count(sid)} {heading}" for sid, heading in SECTIONS)
    rows = "".join(f"<tr><td>{_esc(t.section)}</td><td><code>{_esc(t.uid)}</code></td>"
                   f'<td class="num">{t.conf:.4f}</td><td>{_esc(t.status)}</td><td class="url">{_esc(t.url)}</td></tr>'
                   for t in sheet.tiles)
    parts.append(f"<details><summary>{len(sheet.tiles)} tiles: {_esc(counts)}</summary><table><thead><tr>"
                 "<th>section</th><th>uid</th><th>conf</th><th>image</th><th>url (not fetched)</th></tr></thead>"
                 f"<tbody>{rows}</tbody></table></details></section>")
    return "".join(parts)


def _dedup_html(view: DedupView, out_dir: Path) -> str:
    c = view.counts
    reasons = ", ".join(f"{n} {reason}" for reason, n in c.get("removed_by_reason", {}).items())
    sets = ", ".join(f"{name} ({n})" for name, n in c.get("eval_sets", {}).items()) or "none"
    parts = [f'<section id="dedup"><h2>Pool hygiene (kd3 dedup)</h2><p>kept {_esc(c.get("kept"))} of '
             f'{_esc(c.get("pool"))} pool samples ({_esc(c.get("distinct_pixels"))} distinct images); removed '
             f"{view.removed}: {_esc(reasons)}. Evaluation sets checked: {_esc(sets)}.</p>"]
    if view.sheet is not None:
        href = _href(out_dir, view.sheet)
        parts.append(f'<p class="note">The {len(view.rows)} closest calls (lowest similarity first): each pair is the '
                     f'removed sample, then its nearest match; similarity: the verified aligned correlation when '
                     f'dedup.verify_similarity is set, else the perceptual cosine.</p><a href="{href}"><img src="{href}" '
                     'alt="removed samples and their nearest matches"></a>')
        rows = "".join(f"<tr><td>{_esc(r['reason'])}</td><td><code>{_esc(r['uid'])}</code></td>"
                       f"<td><code>{_esc(r['nearest'])}</code></td><td class=\"num\">{r['similarity']:.4f}</td>"
                       f'<td class="url">{_esc(r["url"])}</td><td class="url">{_esc(r["nearest_url"])}</td></tr>'
                       for r in view.rows)
        parts.append(f"<details><summary>{len(view.rows)} pairs (all {view.removed} in "
                     f"<code>dedup/removed.parquet</code>)</summary><table><thead><tr><th>reason</th><th>removed uid</th>"
                     "<th>nearest</th><th>similarity</th><th>url (not fetched)</th><th>nearest url</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table></details>")
    return "".join(parts) + "</section>"


def render_html(summary: RunSummary, out_dir: Path, plots: dict[str, Path], sheets: Sequence[Sheet],
                sheet_manifest: Optional[ManifestRef], max_classes: Optional[int], files: Sequence[Path],
                dedup: Optional[DedupView] = None) -> str:
    """The whole page as one string; links are relative to ``out_dir``."""
    out_dir = Path(out_dir)
    tabs = tables(summary, max_classes)
    head = [t for t in tabs if t.anchor in _HEAD_TABLES]
    rest = [t for t in tabs if t.anchor not in _HEAD_TABLES]
    nav = [(t.anchor, t.title) for t in head] + ([("dedup", "Pool hygiene")] if dedup else []) + [("plots", "Plots")]
    nav += [(t.anchor, t.title) for t in rest]
    nav += [("sheets", "Contact sheets"), ("files", "Files")]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    body = [f"<header><h1>kd3 selection report</h1><p class=\"meta\">run <code>{_esc(summary.run_dir)}</code> · "
            f"{len(summary.manifests)} manifest(s), {len(summary.class_names)} classes · generated {now} · "
            f"kd3 {_esc(__version__)}</p><nav>"
            + "".join(f'<a href="#{_esc(a)}">{_esc(t)}</a>' for a, t in nav) + "</nav></header>"]
    groups: list[list[str]] = []  # a headline, then the indented lines under it
    for line in warning_lines(summary):
        if line.startswith(" ") and groups:
            groups[-1].append(line.strip())
        else:
            groups.append([line])
    if groups:
        banner = "".join(f"<p><b>{_esc(head)}</b></p>"
                         + (f"<ul>{''.join(f'<li>{_esc(item)}</li>' for item in items)}</ul>" if items else "")
                         for head, *items in groups)
        body.append(f'<div class="warning" id="warnings">{banner}</div>')
    body += [table_html(t) for t in head]
    if summary.truth_note:
        body.append(f'<p class="note" id="ground-truth-note">{_esc(summary.truth_note)}</p>')
    if dedup is not None:
        body.append(_dedup_html(dedup, out_dir))
    figures = [f'<figure><a href="{_href(out_dir, p)}"><img src="{_href(out_dir, p)}" alt="{_esc(name)}"></a>'
               f"<figcaption>{_esc(name)}</figcaption></figure>" for name, p in plots.items()]
    body.append('<section id="plots"><h2>Plots</h2><div class="plots">'
                + ("".join(figures) or '<p class="note">nothing to plot</p>') + "</div></section>")
    body += [table_html(t) for t in rest]
    shown = list(sheets)
    where = (f"from the <b>{_esc(sheet_manifest.name)}</b> manifest (<code>{_esc(sheet_manifest.path)}</code>), "
             f"ranked by <code>{_esc(summary.final.conf_column)}</code>, grouped by "
             f"<code>{_esc(summary.final.label_column)}</code>") if sheet_manifest else ""
    limit = (f"; first {max_classes} of {len(summary.class_names)} classes (inspect.max_classes)"
             if max_classes is not None and max_classes < len(summary.class_names) else "")
    index = " ".join(f'<a href="#class-{s.class_index}">{_esc(s.class_name)}</a>' for s in shown)
    body.append(f'<section id="sheets"><h2>Contact sheets</h2><p class="note">Tiles {where}{limit}. '
                "Caption: first 8 characters of the uid and the confidence; grey tiles were not found in "
                f"the shards or could not be decoded.</p><p>{index}</p>"
                + "".join(_sheet_html(s, out_dir) for s in shown) + "</section>")
    links = "".join(f'<li><a href="{_href(out_dir, p)}">{_esc(Path(p).relative_to(out_dir).as_posix())}</a></li>'
                    for p in files)
    body.append(f'<section id="files"><h2>Files</h2><ul>{links}</ul></section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>kd3 report — {_esc(Path(summary.run_dir or '').name)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)


def page_links(text: str) -> list[str]:
    """Every href/src of a page, in order (fragments included)."""
    parser = _LinkParser()
    parser.feed(text)
    return parser.links


def check_links(index: Path) -> list[str]:
    """Problems with the page's links: external or absolute ones, and relative ones to missing files."""
    problems = []
    for link in page_links(Path(index).read_text()):
        if link.startswith("#"):
            continue
        parts = urlsplit(link)
        if parts.scheme or parts.netloc or link.startswith("/"):
            problems.append(f"{link} (not a relative link)")
        elif not (Path(index).parent / unquote(parts.path)).is_file():
            problems.append(f"{link} (missing file)")
    return problems


# ---------------------------------------------------------------------------------------- build
def build_report(run_dir: Path, out_dir: Path, top_n: int = 16, bottom_n: int = 8, rejected_n: int = 8,
                 max_classes: Optional[int] = None, thumbnail_size: int = 64, histogram_bins: int = 20,
                 refs: Optional[Sequence[ManifestRef]] = None, train: str = TRAIN_DIR,
                 truth: TruthSettings = DEFAULT_TRUTH,
                 eval_datasets: Optional[dict[str, tuple[Path, str, Optional[str]]]] = None) -> InspectResult:
    """Summaries, plots, contact sheets of the final manifest and ``index.html`` in ``out_dir``.

    ``truth`` says where the URL list keeps its ground truth (purity and recall tables, a plot)
    and when one class counts as absorbing the distractors (the warning atop the page).
    With a finished dedup stage the page shows what it removed; ``eval_datasets`` (name → path,
    format, label key) finds the evaluation images it matched.
    """
    from kd3.inspect import plots as P

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    plot_dir = out_dir / PLOTS_DIR
    candidates = {  # each returns None when it has nothing to show (called once the summary exists)
        "selection size per class": lambda: P.plot_selection_per_class(summary, plot_dir / "selection_per_class.png",
                                                                       max_classes),
        "class thresholds τ_k and α": lambda: P.plot_thresholds(summary, plot_dir / "thresholds.png", max_classes),
        "training curves": lambda: P.plot_training(summary.metrics, plot_dir / "training.png"),
        "confidence histogram": lambda: P.plot_confidence(summary, plot_dir / "confidence.png"),
        "purity and in-domain recall (ground truth)": lambda: P.plot_ground_truth(summary, plot_dir / "purity.png"),
    }
    # the summary, each plot, the contact sheets, the page: matplotlib and the shard reads take seconds each
    progress = Progress(desc="[inspect] report", unit="parts", total=len(candidates) + 3)
    refs = list(refs) if refs is not None else find_manifests(run_dir, train)
    summary = summarize_run(run_dir, histogram_bins, refs, train, truth)
    text = format_summary(summary, max_classes)
    atomic_write_text(out_dir / "summary.txt", text + "\n")
    atomic_write_json(out_dir / "summary.json", summary.to_dict())
    progress.update()
    plots = {}
    for name, plot in candidates.items():
        made = plot()
        if made is not None:
            plots[name] = made
        progress.update()
    final_ref = next(r for r in refs if str(r.path) == summary.final.path)
    classes = list(range(len(summary.class_names)))[:max_classes]
    sheets = build_sheets(final_ref, run_dir / "download" / "shards", out_dir / SHEETS_DIR, summary.class_names,
                          classes, summary.final.selected_per_class, top_n, bottom_n, rejected_n, thumbnail_size)
    dedup = dedup_view(run_dir, out_dir, eval_datasets or {}, summary.class_names, thumbnail_size)
    progress.update()
    files = [out_dir / "summary.txt", out_dir / "summary.json", *plots.values()]
    if (out_dir / "meta.json").is_file():
        files.append(out_dir / "meta.json")
    page = render_html(summary, out_dir, plots, sheets, final_ref, max_classes, files, dedup)
    index = out_dir / INDEX
    atomic_write_text(index, page)
    problems = check_links(index)
    if problems:  # a bug, not a user error; fail loudly rather than hand out a broken page
        raise Kd3Error(f"{index}: broken links: {', '.join(problems[:5])}")
    progress.update()
    progress.close()
    return InspectResult(index, summary, text, plots, sheets)
