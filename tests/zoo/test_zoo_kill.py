"""kill -9 of a download stage takes img2dataset's worker processes with it (loopback only)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from kd3.data.loopback import LoopbackHTTPServer

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, state) of every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> set[int]:
    table, found, frontier = _processes(), set(), {pid}
    while frontier:
        frontier = {p for p, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    table = _processes()
    return {p for p in pids if p in table and table[p][1] != "Z"}


def _wait_for(condition, what: str, limit: float = 60.0):
    """Poll ``condition`` until it holds; the limit only bounds a broken run, no timing is asserted."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def test_kill_9_of_download_kills_the_img2dataset_workers(tmp_path):
    requested, release = threading.Event(), threading.Event()

    class Stalling(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            requested.set()
            release.wait(120)  # hold every download open until the test ends
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = LoopbackHTTPServer("127.0.0.1", Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"http://127.0.0.1:{server.server_address[1]}/{i}.png\n" for i in range(4)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    kd3 = subprocess.Popen([sys.executable, "-m", "kd3.cli", "download", "--config", str(REPO / "pipelines/demo.yaml"),
                            "--run-dir", str(tmp_path / "run"), "-q", f"download.url_list={urls}",
                            "download.serve_root=null", "download.processes_count=1", "download.thread_count=2",
                            "download.timeout=120", "download.retries=0"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        assert requested.wait(120), "img2dataset never fetched a URL"  # its worker process is running now
        workers = _descendants(kd3.pid)
        kd3.send_signal(signal.SIGKILL)
        kd3.wait()
        _wait_for(lambda: not _alive(workers), f"the stage's child processes {sorted(workers)} to die with it")
    finally:
        release.set()
        server.shutdown()
        if kd3.poll() is None:
            kd3.kill()
        for pid in _alive(workers):  # only on failure: clean up what the stage left
            os.kill(pid, signal.SIGKILL)
