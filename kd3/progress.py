"""Progress of long loops, for terminals and for batch logs alike.

On a terminal (stderr is a TTY) a tqdm bar is drawn; everywhere a line such as
``[score] teacher: 1536/2600 samples (59%), 812 samples/s, ETA 0:00:01`` is logged every
:data:`settings.every` seconds (``--progress-every``; 0: never), with a last line when the loop ends
if it ran long enough to log one. On a terminal those lines go to the stage's log file only, so
the bar is not interrupted; in a pipe, a make log or a Slurm log they are the progress.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, TypeVar

from kd3.logs import FILE_ONLY

T = TypeVar("T")


@dataclass
class Settings:
    #: seconds between progress lines (0: no lines)
    every: float = 5.0
    #: draw tqdm bars when stderr is a terminal
    bars: bool = True


settings = Settings()


def format_duration(seconds: float) -> str:
    """``h:mm:ss``."""
    seconds = int(round(max(seconds, 0.0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_rate(count: float, seconds: float, unit: str) -> str:
    """``12.3 samples/s``, or ``4.1 s/sample`` below one a second (a plural unit loses its "s")."""
    if count <= 0 or seconds <= 0:
        return f"? {unit}/s"
    rate = count / seconds
    return f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit.removesuffix('s')}"


class Progress:
    """Count work done; log periodic lines (and drive a tqdm bar on a terminal).

    Use as ``for x in Progress(items, "[train] epoch 1/10", unit="batch", total=n)``, or call
    :meth:`update` and :meth:`close` (a ``with`` block closes it).
    """

    def __init__(self, iterable: Optional[Iterable[T]] = None, desc: str = "", *, total: Optional[int] = None,
                 unit: str = "it", logger: Optional[logging.Logger] = None, every: Optional[float] = None,
                 initial: int = 0):
        self.iterable = iterable
        self.desc, self.unit = desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.log = logger or logging.getLogger("kd3.progress")
        self.every = settings.every if every is None else every
        self.done = self.initial = initial
        self.start = self.last = time.monotonic()
        self.lines = 0
        self.logged_done = -1
        self.closed = False
        self.bar = None
        if settings.bars and _stderr_is_tty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=False, file=sys.stderr,
                            dynamic_ncols=True)

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None, "Progress() without an iterable: call update() instead"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        now = time.monotonic()
        if self.every > 0 and now - self.last >= self.every:
            self.last = now
            self._line(now)

    def line(self) -> str:
        """The progress so far as one line (what is logged)."""
        elapsed = time.monotonic() - self.start
        new = self.done - self.initial
        if self.total:
            text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({self.done / self.total:.0%})"
        else:
            text = f"{self.desc}: {self.done} {self.unit}"
        text += f", {format_rate(new, elapsed, self.unit)}"
        if self.total and new > 0 and self.done < self.total:
            text += f", ETA {format_duration(elapsed / new * (self.total - self.done))}"
        elif self.total and self.done >= self.total:
            text += f", done in {format_duration(elapsed)}"
        return text

    def _line(self, now: float) -> None:
        self.lines += 1
        self.logged_done = self.done
        self.log.info(self.line(), extra=FILE_ONLY if self.bar is not None else None)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.lines and self.every > 0 and self.logged_done != self.done:  # it said something: say it ended
            self._line(time.monotonic())
        if self.bar is not None:
            self.bar.close()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
