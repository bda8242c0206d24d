"""`kd3 bench --config benchmarks/quality.yaml`: every method × seed × scenario → BENCHMARKS.md.

Upstream stages are built once per scenario (``RUNS/<scenario>/``) and shared; every cell trains a
student with ``run.seed`` = its seed and is measured (last epoch and its weight average: private and
shifted top-1, agreement, KL, ECE; selection size and purity against the pool's ground truth; train
time; accuracy per epoch). Cells are resumable: results are saved per cell and reused for the same
settings. ``--quick`` runs the spec's quick subset (used by the test suite).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "bench"
SUMMARY = "quality benchmark: methods × seeds × scenarios → BENCHMARKS.md (tables, per-epoch plots)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="benchmarks/quality.yaml", help="benchmark spec (default %(default)s)")
    parser.add_argument("--runs-dir", default="runs/bench", help="where scenario run folders go (default %(default)s)")
    parser.add_argument("--output", default="BENCHMARKS.md", help="markdown file whose quality section is rewritten")
    parser.add_argument("--plots-dir", default="benchmarks", help="where the per-epoch plots go (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the spec's quick subset: few methods, one seed, tiny pool")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds instead of the spec's")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the spec's methods")
    parser.add_argument("--scenarios", default=None, help="comma-separated subset of the spec's scenarios")
    parser.add_argument("--device", default="cpu", help="device for training and evaluation (default cpu)")


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def _pick(given: str | None, default: list, known, what: str) -> list:
    from kd3.errors import Kd3Error

    if given is None:
        return list(default)
    items = [type(default[0])(x) if default else x for x in given.split(",") if x]
    unknown = [x for x in items if x not in known] if known is not None else []
    if unknown:
        raise Kd3Error(f"--{what}: unknown {what} {unknown} (known: {', '.join(map(str, known))})")
    return items


def main(args: argparse.Namespace) -> int:
    import torch

    from kd3.bench import cells, report
    from kd3.bench.spec import load_spec
    from kd3.errors import Kd3Error

    spec = load_spec(args.config)
    base_seeds = spec.quick.seeds if args.quick else spec.seeds
    base_methods = (spec.quick.methods or list(spec.methods)) if args.quick else list(spec.methods)
    base_scenarios = (spec.quick.scenarios or list(spec.scenarios)) if args.quick else list(spec.scenarios)
    seeds = _pick(args.seeds, base_seeds, None, "seeds")
    methods = spec.ordered_methods(_pick(args.methods, base_methods, spec.methods, "methods"))
    scenarios = _pick(args.scenarios, base_scenarios, spec.scenarios, "scenarios")
    device = torch.device(args.device)
    runs_dir, output, plots_dir = Path(args.runs_dir), Path(args.output), Path(args.plots_dir)
    command = "kd3 bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else \
        f"kd3 bench --config {args.config}" + (" --quick" if args.quick else "")
    sections = [f"## {spec.title} ({'quick mode, ' if args.quick else ''}{len(seeds)} seed(s))", "",
                f"Produced by `{command}` on {_machine()}, {_dt.date.today().isoformat()}. "
                f"Recipe for every method: `{' '.join(spec.recipe) or '(pipeline defaults)'}`; each training run "
                f"also keeps its {spec.averaging_mode.upper()} average. Numbers are means ± standard deviation "
                "over seeds (the student's seed; teacher and pool are fixed per scenario); 'selected' is the "
                "mean selection size per epoch, 'purity' its share of in-domain images (ground truth kept beside "
                "the pool, never given to a method).", ""]
    for scenario in scenarios:
        started = time.monotonic()
        sr = cells.scenario_run(spec, scenario, runs_dir, args.quick, device, log.info)
        results: dict = {}
        teachers: dict = {}  # run folder → the teacher its methods distil from
        for name in methods:
            try:
                cell_run = cells.variant_run(sr, spec.methods[name], log.info)
            except Kd3Error as exc:
                log.warning(f"[bench] {scenario} {name}: its run folder failed: {exc}")
                results.update({(name, seed): {"method": name, "seed": seed, "error": str(exc)} for seed in seeds})
                continue
            teachers.setdefault(cell_run.run_dir.name, {"run": cell_run, "methods": []})["methods"].append(name)
            for seed in seeds:
                try:
                    results[(name, seed)] = cells.run_cell(spec, cell_run, name, seed, results, log.info)
                except Kd3Error as exc:
                    log.warning(f"[bench] {scenario} {name} seed {seed}: failed: {exc}")
                    results[(name, seed)] = {"method": name, "seed": seed, "error": str(exc)}
        rows = report.summarise(sr.scenario.private_dataset, sr.scenario.shifted_dataset, results, methods)
        plot = report.curves_plot(plots_dir / f"{spec.section}_{scenario}{'_quick' if args.quick else ''}.png", scenario, rows)
        wall = time.monotonic() - started
        # training time from each cell's train stage (meta.json): the same whether a cell was just
        # trained or reused
        train_total = sum(c.get("train_seconds") or 0 for c in results.values())
        sections += [f"### Scenario `{scenario}` (`{sr.scenario.config}` {' '.join(sr.scenario.overrides)})", "",
                     f"Wall time of this invocation for the scenario: {wall / 60:.1f} min (finished cells are "
                     f"reused); training time of all its cells (each train stage's meta.json): "
                     f"{train_total / 60:.1f} min. "
                     f"Headline: `{sr.scenario.private_dataset}` (private test split) and "
                     f"`{sr.scenario.shifted_dataset}` (shifted domain).", "",
                     report.table(spec, rows), "", *report.verdict(spec, rows), "",
                     *(["Teachers the methods distil from (each method's cells use the teacher of its run folder; "
                        "agreement and KL above are against that teacher):", "",
                        report.teachers_table({label: cells.teacher_summary(t["run"], t["methods"])
                                               for label, t in teachers.items()}, rows), ""]
                       if len(teachers) > 1 else []),
                     report.selection_tables(rows), "",
                     "Methods: " + "; ".join(f"`{m}` = {spec.methods[m].description or ' '.join(spec.methods[m].overrides)}"
                                             for m in methods), "",
                     f"![accuracy per epoch]({os.path.relpath(plot, output.parent)})",
                     ""]
        log.info(report.table(spec, rows))
        for line in report.verdict(spec, rows):
            log.info(line)
    report.write_section(output, "\n".join(sections), spec.section)
    log.info(f"[bench] wrote {output}")
    return 0
