"""Work in a child process group that dies with the stage that started it, however the stage ends.

img2dataset runs a pool of worker processes; killed with ``kill -9``, kd3 could not stop them, and
they went on downloading into a folder no stage owned. :func:`run_in_group` runs a function in a
spawned child that leads its own process group (the pool's workers join it) and watches its
parent: when the parent is gone (its parent PID changes), it kills the whole group. On an ordinary
return, an exception or Ctrl-C in the parent, the group is killed as well.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable

from kd3.errors import Kd3Error

#: seconds between the child's checks that its parent is still alive
WATCH_EVERY = 0.2


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(WATCH_EVERY)
        if os.getppid() != parent_pid:  # re-parented: the stage process is gone
            os.killpg(0, signal.SIGKILL)


def _group_main(parent_pid: int, target: Callable[..., Any], args: tuple) -> None:
    os.setpgrp()
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="kd3-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the watch started
        os.killpg(0, signal.SIGKILL)
    target(*args)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_in_group(what: str, target: Callable[..., Any], *args: Any) -> None:
    """``target(*args)`` in a spawned child process group (``target`` and ``args`` must pickle); a
    Kd3Error naming ``what`` when it fails. Every process of the group is gone when this returns."""
    proc = multiprocessing.get_context("spawn").Process(target=_group_main, args=(os.getpid(), target, args),
                                                        name=f"kd3-{what}")
    proc.start()
    try:
        proc.join()
    finally:
        _kill_group(proc.pid)  # workers left behind by the target, or all of it on Ctrl-C
        proc.join()
    if proc.exitcode != 0:
        raise Kd3Error(f"{what} stopped with exit status {proc.exitcode} (its traceback, if any, is above)")
