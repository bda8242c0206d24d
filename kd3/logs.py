"""Logging for terminals and batch jobs: the console on stdout, and one log file per stage folder.

Every kd3 module logs through ``logging.getLogger(__name__)`` (all under the ``kd3`` logger); the CLI
calls :func:`setup` once. The console shows messages as they are (they carry their own ``[stage]``
prefix) on stdout, as the prints they replace did, so a result such as the evaluate table or the
report path stays where scripts and ``make`` read it; ``--quiet`` keeps warnings and errors only,
``--verbose`` adds debug lines. While a stage runs, :func:`stage_log` also appends every record, with
time and level, to ``RUN/<stage>/stage.log`` (kept across ``--resume``), whatever the console shows.

A record logged with ``extra=FILE_ONLY`` goes to the log file but not the console: progress lines
while a tqdm bar is drawn on a terminal, and the traceback of a failed stage (the console gets the
one-line error).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

LOGGER = "kd3"
#: ``extra=`` for a record the log file gets and the console does not
FILE_ONLY = {"console": False}
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}


class _Console(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is at the time (pytest's capture swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property ignores that
        pass


def _for_console(record: logging.LogRecord) -> bool:
    return getattr(record, "console", True)


def setup(verbosity: str = "normal") -> None:
    """Install the console handler on the ``kd3`` logger (idempotent: a second call replaces it).

    ``verbosity``: "quiet" (warnings and errors), "normal" (also info: progress, results) or
    "verbose" (also debug).
    """
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _Console)]:
        logger.removeHandler(handler)
    console = _Console()
    console.setLevel(_LEVELS[verbosity])
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(_for_console)
    logger.addHandler(console)
    # the logger passes info (for the stage log files) even when the console shows warnings only
    logger.setLevel(min(_LEVELS[verbosity], logging.INFO))


@contextlib.contextmanager
def stage_log(path: str | Path, header: str) -> Iterator[Path]:
    """Append every ``kd3`` record to ``path`` while the block runs (the stage folder must exist)."""
    path = Path(path)
    logger = logging.getLogger(LOGGER)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(logging.DEBUG)
    previous = logger.level
    if logger.getEffectiveLevel() > logging.INFO:  # no setup() (a library caller): still fill the file
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        logger.info(header, extra=FILE_ONLY)
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(previous)
