"""Stopping a training run cleanly when the cluster asks (Slurm preemption, time limit, ``scancel``).

SIGTERM or SIGUSR1 (``sbatch --signal=USR1@120`` sends it ahead of the time limit) sets a flag;
the loop finishes the optimiser step in progress and raises :class:`Preempted`. The checkpoint on
disk is then ``last.pt`` of the last finished epoch (written atomically after every epoch), from
which ``kd3 train --resume`` redoes the interrupted epoch from its start, with the same data order,
selection and averages as an uninterrupted run (exact resume). The command exits with
:data:`EXIT_CODE`. Under torchrun every rank gets the signal and all ranks stop at the same step
(the flag travels with the step's gradient all-reduce).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

#: the exit status of a preempted stage (EX_TEMPFAIL: "try again later"; a Slurm script requeues on it)
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after a finished step; ``--resume`` continues from ``last.pt``."""


@dataclass
class StopRequest:
    """Set by the signal handler; read by the training loop after every step."""

    signal_number: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.requested else ""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGTERM / SIGUSR1 while the block runs (previous handlers restored afterwards). Outside
    the main thread (a library caller's worker thread) signals cannot be caught: the request then
    never fires and signals keep their usual effect."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame) -> None:
        request.signal_number = signum

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
