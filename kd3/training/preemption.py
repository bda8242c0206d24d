"""Stopping a training run cleanly when the cluster asks (Slurm preemption, time limit, ``scancel``).

SIGTERM or SIGUSR1 (``sbatch --signal=USR1@120`` sends it ahead of the time limit) sets a flag;
the loop finishes the optimiser step in progress (a whole accumulation group: it stops only at an
optimiser-step boundary), writes a mid-epoch checkpoint ``resume.pt`` atomically and raises
:class:`Preempted`; the command exits with :data:`EXIT_CODE`. ``resume.pt`` is ``last.pt``'s
trainer state (weights, optimiser, schedule, GradScaler, averages, RNG) plus the epoch's progress:
the steps done, the epoch's selection, the running metric sums and feature weights, and every
rank's augmentation and global RNG streams. ``kd3 train --resume`` continues with the next step
over the same remaining data in the same order (the done batches are read and dropped) and ends
at the same weights as an uninterrupted run (bit for bit on the CPU; tests/e2e/test_preemption.py).
``train.checkpoint_every_steps`` writes the same checkpoint periodically, for a node that dies
without a signal. ``resume.pt`` is removed once its epoch finishes; a stop before an epoch's
selection leaves ``last.pt`` of the previous epoch as the resume point. Under torchrun every rank
gets the signal and all ranks stop at the same step (the flag travels with the step's gradient
all-reduce); every rank takes part in gathering the checkpoint, rank 0 writes it and the others
wait for it before exiting.
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
    """Training stopped on a signal after a finished step; ``--resume`` continues from ``resume.pt``
    (or ``last.pt`` when it stopped before an epoch's selection)."""


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
