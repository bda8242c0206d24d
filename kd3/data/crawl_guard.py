"""The crawl guard: a filtering forward proxy on 127.0.0.1 that every request of img2dataset goes through.

img2dataset 1.47 fetches with ``urllib.request.urlopen`` in worker processes it *spawns*, so nothing
patched into the kd3 process reaches them; but urllib honours ``http_proxy``/``https_proxy``/``ftp_proxy``
from the environment, which spawned workers inherit. The download stage starts this proxy for its
lifetime and points those variables at it (``no_proxy`` cleared, so nothing bypasses it). For every
request, and so for every redirect hop (urllib follows redirects itself, each through the proxy):

- only ``http`` (plain GET) and ``CONNECT`` (https) are served; anything else (``ftp://`` arriving via
  ``ftp_proxy``) is refused;
- the host is resolved here, every address is checked with :class:`kd3.data.urls.AddressPolicy`, and
  the connection goes to a checked address (no second lookup, so no DNS-rebinding gap);
- a whole-request deadline and a byte cap bound each request; for plain http the response is held
  here (at most ``max_bytes``) and its image header sniffed (PNG, GIF, JPEG, WebP), so an image with
  too many pixels is refused before any byte of it reaches the decoder. While it waits the proxy sends
  ``100 Continue`` interim responses, which an HTTP/1.1 client skips, so img2dataset's per-read
  ``timeout`` keeps meaning "silence", not "a slow but live download".

A refusal is an HTTP answer whose reason phrase starts with :data:`GUARD_PREFIX`; img2dataset records
it as the URL's error message (``HTTP Error 403: kd3 guard: private address (10.0.0.1)``, or
``Tunnel connection failed: 403 kd3 guard: …`` for https), and :func:`guard_reason` reads it back.
Inside an https tunnel the proxy can only cut the connection (deadline, byte cap); the pixel limit
there is the decoder's (OpenCV's ``OPENCV_IO_MAX_IMAGE_PIXELS``, set by the download stage).
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import http.server
import logging
import math
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional
from urllib.parse import urlsplit

from kd3.data.loopback import LOOPBACK, LoopbackHTTPServer
from kd3.data.urls import AddressPolicy, UrlRefused, normalize_url

log = logging.getLogger(__name__)

GUARD_PREFIX = "kd3 guard: "
#: environment variables urllib reads for proxies (both cases: urllib reads either)
PROXY_VARIABLES = ("http_proxy", "https_proxy", "ftp_proxy")
BYPASS_VARIABLES = ("no_proxy", "NO_PROXY")
#: request headers that belong to one connection, not to the request (RFC 9110 §7.6.1)
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
               "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length"}
_CHUNK = 64 * 1024
#: TLS records and handshakes add bytes around the body; a tunnel may carry this much beyond max_bytes
_TLS_SLACK = 256 * 1024
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0xD8, 0x01, *range(0xD0, 0xD8)}


@dataclass(frozen=True)
class GuardLimits:
    #: most pixels (width × height) an image may declare
    max_pixels: int
    #: most bytes one response may carry
    max_bytes: int
    #: seconds one request (one redirect hop) may take in all
    deadline: float
    #: seconds of silence from a server before giving up (img2dataset's own timeout)
    timeout: float


def guard_reason(message: str) -> Optional[str]:
    """The guard's reason in an img2dataset error message (without the address detail), else None."""
    if GUARD_PREFIX not in message:
        return None
    return message.split(GUARD_PREFIX, 1)[1].split(" (", 1)[0].strip()


def image_dimensions(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from the header of a PNG, GIF, JPEG or WebP; None while unknown or not an image."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return struct.unpack(">II", data[16:24]) if len(data) >= 24 and data[12:16] == b"IHDR" else None
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", data[6:10]) if len(data) >= 10 else None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_dimensions(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_dimensions(data)
    return None


def _webp_dimensions(data: bytes) -> Optional[tuple[int, int]]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _jpeg_dimensions(data: bytes) -> Optional[tuple[int, int]]:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None  # not a marker: leave the verdict to the decoder
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1  # fill byte
            continue
        if marker in _JPEG_NO_LENGTH:
            i += 2
            continue
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


class _RequestTimer:
    """One request's deadline and heartbeat, kept by the guard's :class:`_Watchdog` thread.

    At the deadline the watchdog shuts the sockets added here down, so no blocking read outlives it;
    with a ``wfile`` it also writes ``100 Continue`` to the client every ``interval`` s (HTTP/1.1
    clients skip 1xx) until the request ends."""

    def __init__(self, deadline: float, wfile=None, interval: float = 1.0) -> None:
        now = time.monotonic()
        self.deadline_at, self.interval, self.next_beat = now + deadline, interval, now + interval
        self.expired = False
        self.client_gone = False
        self._wfile = wfile
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def add_socket(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)

    def next_due(self) -> float:
        """When the watchdog next has to act on this request (inf: never)."""
        deadline = math.inf if self.expired else self.deadline_at
        beat = self.next_beat if self._wfile is not None and not self.client_gone else math.inf
        return min(deadline, beat)

    def act(self, now: float) -> None:
        """What is due at ``now`` (watchdog thread only): cut the sockets, or beat."""
        if not self.expired and now >= self.deadline_at:
            with self._lock:
                self.expired = True
                sockets = list(self._sockets)
            for sock in sockets:
                _shutdown(sock)
        if now >= self.next_beat:
            self.next_beat = now + self.interval
            with self._lock:  # the request's own answer waits for a beat in progress (see finish)
                if self._wfile is None or self.client_gone:
                    return
                try:
                    self._wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    self._wfile.flush()
                except OSError:
                    self.client_gone = True

    def finish(self) -> None:
        """No beat after this returns (the handler writes its answer next)."""
        with self._lock:
            self._wfile = None


class _Watchdog:
    """One thread for every request's deadline and heartbeat (two threads per request cost ~0.7 ms
    each on loopback: a third of the guard's overhead). It sleeps until the nearest due time."""

    def __init__(self) -> None:
        self._active: set[_RequestTimer] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kd3-guard-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def request(self, deadline: float, wfile=None, interval: float = 1.0) -> Iterator[_RequestTimer]:
        timer = _RequestTimer(deadline, wfile, interval)
        with self._cond:
            self._active.add(timer)
            self._cond.notify()
        try:
            yield timer
        finally:
            with self._cond:
                self._active.discard(timer)
            timer.finish()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = [t for t in self._active if t.next_due() <= now]
                if not due:
                    wake = min((t.next_due() for t in self._active), default=math.inf)
                    self._cond.wait(None if wake == math.inf else wake - now)
                    continue
            for timer in due:  # outside the condition: a beat may block on a slow client
                timer.act(now)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _phrase(text: str) -> str:
    """A reason phrase that fits in a status line (one line, latin-1)."""
    return " ".join(str(text).split()).encode("latin-1", "replace").decode("latin-1")[:300]


class _GuardHandler(http.server.BaseHTTPRequestHandler):
    server: "_GuardServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per request would drown the stage's output; counts go to the stage's meta.json

    def setup(self) -> None:
        super().setup()
        limits = self.server.limits
        self.connection.settimeout(limits.deadline + limits.timeout + 5)

    # -- answers ------------------------------------------------------------------------------
    def _answer(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.close_connection = True
        lines = [f"HTTP/1.1 {status} {_phrase(reason)}"]
        lines += [f"{k}: {_phrase(v)}" for k, v in headers]
        lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        with contextlib.suppress(OSError):
            self.wfile.write("\r\n".join(lines).encode("latin-1") + body)
            self.wfile.flush()

    def _refuse(self, status: int, refusal: UrlRefused) -> None:
        self.server.count(refusal.reason)
        text = f"{GUARD_PREFIX}{refusal}"
        self._answer(status, text, [("X-Kd3-Guard", refusal.reason), ("Content-Type", "text/plain")],
                     (text + "\n").encode("utf-8", "replace"))

    # -- plain http ---------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        try:
            url = normalize_url(self.path)
            parts = urlsplit(url)
            if parts.scheme != "http":
                raise UrlRefused("scheme not http(s)", f"{parts.scheme} without CONNECT")
            port = parts.port or 80
            addresses = self.server.policy.check_host(parts.hostname or "", port)
        except UrlRefused as refusal:
            return self._refuse(403, refusal)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        limits = self.server.limits
        with self.server.watchdog.request(limits.deadline, self.wfile, min(1.0, limits.timeout / 3)) as timer:
            try:
                answer = self._fetch(addresses, port, parts.netloc.rpartition("@")[2], target, timer)
            except UrlRefused as refusal:
                answer = refusal
            except (OSError, http.client.HTTPException) as exc:
                if timer.expired:
                    answer = UrlRefused("deadline exceeded", f"{limits.deadline:g} s")
                elif isinstance(exc, TimeoutError):
                    answer = UrlRefused("timeout", f"no data for {limits.timeout:g} s")
                else:
                    answer = UrlRefused("connection error", f"{type(exc).__name__}: {exc}")
        if timer.client_gone:
            return
        if isinstance(answer, UrlRefused):
            status = {"deadline exceeded": 504, "timeout": 504, "connection error": 502}.get(answer.reason, 403)
            return self._refuse(status, answer)
        self.server.count("relayed")
        self._answer(*answer)

    def _connect(self, addresses: list[str], port: int, timer: _RequestTimer) -> socket.socket:
        error: Optional[OSError] = None
        for address in addresses:
            try:
                sock = socket.create_connection((address, port), timeout=self.server.limits.timeout)
            except OSError as exc:
                error = exc
                continue
            timer.add_socket(sock)
            return sock
        raise error or OSError("no address to connect to")

    def _fetch(self, addresses: list[str], port: int, host: str, target: str, timer: _RequestTimer):
        limits = self.server.limits
        conn = http.client.HTTPConnection(addresses[0], port, timeout=limits.timeout)
        conn.sock = self._connect(addresses, port, timer)
        try:
            conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host)
            for key, value in self.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    conn.putheader(key, value)
            conn.putheader("Connection", "close")
            conn.endheaders()
            response = conn.getresponse()
            declared = response.getheader("Content-Length")
            if declared and declared.strip().isdigit() and int(declared) > limits.max_bytes:
                raise UrlRefused("too many bytes", f"{int(declared)} > {limits.max_bytes}")
            body = self._read_body(response, timer, sniff=200 <= response.status < 300)
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            return response.status, response.reason, headers, body
        finally:
            conn.close()

    def _read_body(self, response: http.client.HTTPResponse, timer: _RequestTimer, sniff: bool) -> bytes:
        limits = self.server.limits
        body = bytearray()
        while True:
            chunk = response.read1(_CHUNK)
            if timer.expired:
                raise UrlRefused("deadline exceeded", f"{limits.deadline:g} s")
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > limits.max_bytes:
                raise UrlRefused("too many bytes", f"more than {limits.max_bytes}")
            if sniff:
                size = image_dimensions(bytes(body[:_CHUNK * 4]))
                if size is not None:
                    sniff = False
                    if size[0] * size[1] > limits.max_pixels:
                        raise UrlRefused("too many pixels", f"{size[0]}x{size[1]} > {limits.max_pixels}")
                elif len(body) >= _CHUNK * 4:
                    sniff = False  # no header found early: the decoder's limit applies

    # -- https: a checked tunnel ------------------------------------------------------------------
    def do_CONNECT(self) -> None:  # noqa: N802 - stdlib name
        host, _, port_text = self.path.rpartition(":")
        limits = self.server.limits
        try:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise UrlRefused("bad url", f"CONNECT {self.path}")
            addresses = self.server.policy.check_host(host, int(port_text))
        except UrlRefused as refusal:
            return self._refuse(403, refusal)
        with self.server.watchdog.request(limits.deadline) as timer:
            timer.add_socket(self.connection)
            try:
                upstream = self._connect(addresses, int(port_text), timer)
            except OSError as exc:
                reason = "deadline exceeded" if timer.expired else "connection error"
                return self._refuse(502, UrlRefused(reason, f"{type(exc).__name__}: {exc}"))
            with upstream:
                self._answer_tunnel_open()
                outcome = self._pump(upstream, timer)
        self.server.count(outcome)

    def _answer_tunnel_open(self) -> None:
        self.close_connection = True
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()

    def _pump(self, upstream: socket.socket, timer: _RequestTimer) -> str:
        """Copy bytes both ways until either side closes, the deadline passes or too much comes back."""
        limit = self.server.limits.max_bytes + _TLS_SLACK
        received = 0
        client = self.connection
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, upstream)
            selector.register(upstream, selectors.EVENT_READ, client)
            while True:
                events = selector.select(timeout=self.server.limits.timeout)
                if timer.expired:
                    return "deadline exceeded (https tunnel)"
                if not events:
                    return "timeout (https tunnel)"
                for key, _ in events:
                    try:
                        data = key.fileobj.recv(_CHUNK)
                        if not data:
                            return "tunnelled"
                        if key.fileobj is upstream:
                            received += len(data)
                            if received > limit:
                                return "too many bytes (https tunnel)"
                        key.data.sendall(data)
                    except OSError:
                        return "deadline exceeded (https tunnel)" if timer.expired else "tunnelled"

    def _refuse_method(self) -> None:
        self._refuse(405, UrlRefused("method not allowed", self.command))

    do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _refuse_method


class _GuardServer(LoopbackHTTPServer):
    def __init__(self, policy: AddressPolicy, limits: GuardLimits) -> None:
        super().__init__(LOOPBACK, _GuardHandler)
        self.policy, self.limits = policy, limits
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.watchdog = _Watchdog()

    def count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1


@contextlib.contextmanager
def crawl_guard(policy: AddressPolicy, limits: GuardLimits) -> Iterator["_GuardServer"]:
    """Run the guard on a free loopback port for the ``with`` block; yields the server (``.url``,
    ``.counts``: requests by outcome, "relayed" and "tunnelled" for the ones let through)."""
    server = _GuardServer(policy, limits)
    server.url = f"http://{LOOPBACK}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="kd3-crawl-guard", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        server.watchdog.close()
        thread.join(timeout=5)


@contextlib.contextmanager
def proxied_environment(proxy_url: str, extra: Optional[dict[str, str]] = None) -> Iterator[None]:
    """Point urllib in processes spawned inside the block at ``proxy_url`` (no bypass list), plus
    ``extra`` variables; the previous environment comes back afterwards."""
    changes: dict[str, Optional[str]] = {name: proxy_url for name in PROXY_VARIABLES}
    changes.update({name.upper(): proxy_url for name in PROXY_VARIABLES})
    changes.update({name: None for name in BYPASS_VARIABLES})
    changes.update(extra or {})
    saved = {name: os.environ.get(name) for name in changes}
    try:
        _set_environment(changes)
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict[str, Optional[str]]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
