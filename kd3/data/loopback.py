"""A throw-away static file server on 127.0.0.1 for the demo and tests (never any other address)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path
from typing import Iterator

LOOPBACK = "127.0.0.1"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per request would drown the stage's own output


@contextlib.contextmanager
def serve_directory(root: str | Path, startup_timeout: float = 5.0) -> Iterator[str]:
    """Serve ``root`` on a free loopback port; yield the base URL; always shut down on exit."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"loopback server root is not a folder: {root}")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="kd3-loopback", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=startup_timeout)
