"""The contract every stage follows, and the one function that runs a stage under it.

A stage module defines ``NAME``, ``SUMMARY``, ``SECTIONS`` (config sections its output depends
on; or ``sections(cfg)`` when they depend on the config, e.g. the training objective's own section), ``check(cfg, run_dir)`` (validate inputs before any work; returns input fingerprints) and
``run(cfg, out: StageDir) -> dict`` (does the work, returns counts for meta.json). A stage whose
output folder name is configurable also defines ``output_name(cfg)``. A stage whose result is one
file (a report) returns its path as ``counts["output"]``; it is printed as the last line.
A stage that reads a config section outside its ``SECTIONS`` (a batch size, say) lists it in ``READS``;
one that never runs a model sets ``USES_DEVICE = False`` (else ``run.device`` is checked first).
``check`` reads every input the stage will read (files, checkpoints, upstream outputs and their
integrity): it runs before the output folder is opened or deleted, and is all ``--dry-run`` does.
The folder is locked (:func:`kd3.runs.stage_lock`) from before it is opened until the stage ends.
Under torchrun (:mod:`kd3.dist`) rank 0 checks the inputs, takes the lock, opens the folder and
writes meta.json and the stage log; a stage with ``DISTRIBUTED = True`` then runs on every rank
(splitting its work by rank), any other stage on rank 0 alone.

A stage needs only the config sections it reads; one of them missing from the config is a one-line
error before any work. Each stage appends its log to ``RUN/<stage>/stage.log`` (:mod:`kd3.logs`).
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import time
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

from kd3 import dist, layout
from kd3.config import PipelineConfig
from kd3.errors import ConfigError
from kd3.logs import FILE_ONLY, stage_log
from kd3.models.user_code import allow_user_code
from kd3.runs import Mode, StageDir, open_stage, stage_lock
from kd3.runtime import resolve_device

log = logging.getLogger(__name__)

#: config sections with required keys (no defaults); every other section may be left out of a config
REQUIRED_SECTIONS = ("download", "score", "evaluate")


def missing_sections(cfg: PipelineConfig, stage: ModuleType) -> list[str]:
    """The required sections ``stage`` reads that ``cfg`` leaves out."""
    names = set(stage.sections(cfg) if hasattr(stage, "sections") else stage.SECTIONS)
    names |= set(getattr(stage, "READS", ()))
    return [name for name in REQUIRED_SECTIONS if name in names and getattr(cfg, name) is None]


def require_sections(cfg: PipelineConfig, stage: ModuleType) -> None:
    missing = missing_sections(cfg, stage)
    if missing:
        section = typing.get_args(PipelineConfig.model_fields[missing[0]].annotation)[0]  # Optional[<Section>]
        keys = [k for k, f in section.model_fields.items() if f.is_required()]
        raise ConfigError(f"{cfg.source}: kd3 {stage.NAME} reads the {missing[0]!r} section, which the config does "
                          f"not have; add it (required keys: {', '.join(keys)}) or set them as overrides, e.g. "
                          f"{missing[0]}.{keys[0]}=...")


def execute(stage: ModuleType, cfg: PipelineConfig, run_dir: Path, mode: Mode,
            argv: list[str] | None = None, dry_run: bool = False) -> dict[str, Any]:
    """check → apply the folder policy → run → write meta.json (complete or failed).

    User code (``module:factory`` architectures) may be imported only if the config names it.
    """
    with allow_user_code([*cfg.run.user_code, cfg.train.student.arch, cfg.demo_data.teacher.arch]):
        return _execute(stage, cfg, Path(run_dir), mode, argv, dry_run)


def _execute(stage: ModuleType, cfg: PipelineConfig, run_dir: Path, mode: Mode,
             argv: list[str] | None, dry_run: bool) -> dict[str, Any]:
    if dist.world_from_env().size > 1:  # one process never resolves the device here (download needs none)
        dist.init(resolve_device(cfg.run.device).type)
    # under torchrun rank 0 checks and opens the folder; the other ranks get its decisions (or its error)
    inputs = dist.main_decides(lambda: validate(stage, cfg, run_dir))
    folder = stage.output_name(cfg) if hasattr(stage, "output_name") else stage.NAME
    if dry_run:
        log.info(f"[{stage.NAME}] dry run: config and inputs valid; would write {run_dir / folder}")
        return {}
    names = stage.sections(cfg) if hasattr(stage, "sections") else stage.SECTIONS
    config = {name: cfg.section(name) for name in names}
    config["run"] = cfg.section("run")
    # the lock before the folder policy: a second process must not delete or resume a running stage;
    # under torchrun rank 0 holds it for every rank
    with contextlib.ExitStack() as held:
        dist.main_decides(lambda: held.enter_context(stage_lock(run_dir, folder)) and None)
        out = dist.main_decides(lambda: open_stage(run_dir, folder, config, cfg.fingerprint(*names), inputs, mode,
                                                   argv))
        if not dist.is_main():
            # a stage without DISTRIBUTED = True runs on rank 0 alone; the others have nothing to do
            return _run(stage, cfg, out) if getattr(stage, "DISTRIBUTED", False) else {}
        command = shlex.join(argv) if argv else f"kd3 {stage.NAME}"
        with stage_log(out.path / layout.STAGE_LOG, f"---- {command} ({'resumed' if out.resumed else 'started'})"):
            return _run(stage, cfg, out)


def validate(stage: ModuleType, cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    """Every check that needs no output folder (config sections, the device, the stage's inputs), so a
    bad input fails before anything is created or deleted; ``--dry-run`` runs exactly this."""
    require_sections(cfg, stage)
    if getattr(stage, "USES_DEVICE", True):
        resolve_device(cfg.run.device)
    return stage.check(cfg, run_dir)


def _run(stage: ModuleType, cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    if out.up_to_date:
        log.info(f"[{stage.NAME}] up to date in {out.path} (finished {out.meta.get('finished_at')}); "
                 "pass --overwrite to redo it")
        counts = dict(out.meta.get("counts", {}))
        if counts.get("output"):
            log.info(counts["output"])
        return counts
    start = time.monotonic()
    try:
        counts = stage.run(cfg, out)
    except BaseException as exc:
        out.fail(f"{type(exc).__name__}: {exc}")
        # the console gets the one-line error from the CLI; the log file keeps the traceback
        log.error(f"[{stage.NAME}] failed: {type(exc).__name__}: {exc}", exc_info=True, extra=FILE_ONLY)
        raise
    counts["seconds"] = round(time.monotonic() - start, 2)
    out.finish(counts)
    log.info(f"[{stage.NAME}] done in {counts['seconds']:.1f}s -> {out.path}")
    if counts.get("output"):
        log.info(counts["output"])  # the stage's main result, last, for scripts and copy-paste
    return counts
