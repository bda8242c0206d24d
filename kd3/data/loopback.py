"""A throw-away static file server on 127.0.0.1 for the demo and tests (never any other address)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import socketserver
import threading
from pathlib import Path
from typing import Iterator

LOOPBACK = "127.0.0.1"


class LoopbackHTTPServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server that binds a 127.x.x.x address and never looks its name up.

    ``HTTPServer.server_bind`` names the server with ``socket.getfqdn(host)``: a reverse lookup that,
    for an address missing from /etc/hosts (127.0.0.2, or 127.0.0.1 on a bare machine), sends a DNS
    query to the system's resolver, off loopback."""

    daemon_threads = True

    def __init__(self, host: str, handler) -> None:
        if not host.startswith("127."):
            raise ValueError(f"kd3's servers bind loopback addresses only, not {host}")
        super().__init__((host, 0), handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


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
    server = LoopbackHTTPServer(LOOPBACK, handler)
    thread = threading.Thread(target=server.serve_forever, name="kd3-loopback", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=startup_timeout)
