"""The contract every stage follows, and the one function that runs a stage under it.

A stage module defines ``NAME``, ``SUMMARY``, ``SECTIONS`` (config sections its output depends
on; or ``sections(cfg)`` when they depend on the config, e.g. the training objective's own section), ``check(cfg, run_dir)`` (validate inputs before any work; returns input fingerprints) and
``run(cfg, out: StageDir) -> dict`` (does the work, returns counts for meta.json). A stage whose
output folder name is configurable also defines ``output_name(cfg)``. A stage whose result is one
file (a report) returns its path as ``counts["output"]``; it is printed as the last line.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType
from typing import Any

from kd3.config import PipelineConfig
from kd3.models.user_code import allow_user_code
from kd3.runs import Mode, open_stage


def execute(stage: ModuleType, cfg: PipelineConfig, run_dir: Path, mode: Mode,
            argv: list[str] | None = None, dry_run: bool = False) -> dict[str, Any]:
    """check → apply the folder policy → run → write meta.json (complete or failed).

    User code (``module:factory`` architectures) may be imported only if the config names it.
    """
    with allow_user_code([*cfg.run.user_code, cfg.train.student.arch, cfg.demo_data.teacher.arch]):
        return _execute(stage, cfg, Path(run_dir), mode, argv, dry_run)


def _execute(stage: ModuleType, cfg: PipelineConfig, run_dir: Path, mode: Mode,
             argv: list[str] | None, dry_run: bool) -> dict[str, Any]:
    inputs = stage.check(cfg, run_dir)
    folder = stage.output_name(cfg) if hasattr(stage, "output_name") else stage.NAME
    if dry_run:
        print(f"[{stage.NAME}] dry run: config and inputs valid; would write {run_dir / folder}")
        return {}
    names = stage.sections(cfg) if hasattr(stage, "sections") else stage.SECTIONS
    config = {name: cfg.section(name) for name in names}
    config["run"] = cfg.section("run")
    out = open_stage(run_dir, folder, config, cfg.fingerprint(*names), inputs, mode, argv)
    if out.up_to_date:
        print(f"[{stage.NAME}] up to date in {out.path} (finished {out.meta.get('finished_at')}); "
              "pass --overwrite to redo it")
        counts = dict(out.meta.get("counts", {}))
        if counts.get("output"):
            print(counts["output"])
        return counts
    start = time.monotonic()
    try:
        counts = stage.run(cfg, out)
    except BaseException as exc:
        out.fail(f"{type(exc).__name__}: {exc}")
        raise
    counts["seconds"] = round(time.monotonic() - start, 2)
    out.finish(counts)
    print(f"[{stage.NAME}] done in {counts['seconds']:.1f}s -> {out.path}")
    if counts.get("output"):
        print(counts["output"])  # the stage's main result, last, for scripts and copy-paste
    return counts
