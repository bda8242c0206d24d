"""Loopback test servers for the crawl zoo: every request counted, never any address outside 127/8."""

from __future__ import annotations

import contextlib
import http.server
import io
import struct
import threading
import time
import zlib
from typing import Iterator, Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from kd3.data.loopback import LoopbackHTTPServer


def png_bytes(width: int = 24, height: int = 16, value: int = 200) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def one_colour_png(width: int, height: int, rows_per_block: int = 1000) -> bytes:
    """A black greyscale PNG of any size in about a second, never the whole bitmap in memory.

    Deflate forgets its window at a full flush, so one compressed block of ``rows_per_block`` rows is
    repeated as it is; the stream then ends with an empty final block and the Adler-32 of all rows.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    assert height % rows_per_block == 0
    block = b"\x00" * (width + 1) * rows_per_block  # per row: filter byte 0, then black pixels
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)  # with the zlib header
    repeat = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(height // rows_per_block):
        checksum = zlib.adler32(block, checksum)
    idat = first + repeat * (height // rows_per_block - 1) + b"\x03\x00" + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class CountingServer(LoopbackHTTPServer):
    """Routes: /img… (a small PNG), /redirect?to=URL (302), /drip (8 bytes a second), /bomb.png,
    /slow.png (the small PNG in 8 pieces, a quarter of a second apart: 2 s in all, then done)."""

    def __init__(self, host: str, bomb: Optional[bytes] = None) -> None:
        super().__init__(host, _Handler)  # loopback only, no name lookup
        self.requests: list[str] = []
        self.bomb = bomb
        self.stop_drip = threading.Event()

    @property
    def base(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: CountingServer

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):  # noqa: N802
        self.server.requests.append(self.path)
        parts = urlsplit(self.path)
        if parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not self.server.stop_drip.wait(0.125):  # 8 bytes a second
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
        elif parts.path == "/slow.png":
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            step = -(-len(body) // 8)
            for start in range(0, len(body), step):
                if self.server.stop_drip.wait(0.25):
                    return
                self.wfile.write(body[start:start + step])
                self.wfile.flush()
        elif parts.path == "/bomb.png" and self.server.bomb is not None:
            self._send(self.server.bomb)
        elif parts.path.startswith("/img"):
            self._send(png_bytes())
        else:
            self.send_error(404)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def counting_server(host: str = "127.0.0.1", bomb: Optional[bytes] = None) -> Iterator[CountingServer]:
    server = CountingServer(host, bomb)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop_drip.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        time.sleep(0)  # let handler threads see the stop event
