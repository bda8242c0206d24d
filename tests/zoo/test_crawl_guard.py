"""The crawl guard (the filtering proxy) on loopback only: urllib in this process goes through it the
way img2dataset's workers do. Servers bind 127.0.0.1 / 127.0.0.2; nothing else is ever contacted."""

from __future__ import annotations

import io
import socket
import urllib.error
import urllib.request

import pytest
from PIL import Image

from kd3.data.crawl_guard import GuardLimits, crawl_guard, guard_reason, image_dimensions
from kd3.data.urls import AddressPolicy, parse_networks
from tests.zoo.crawl_servers import counting_server, one_colour_png, png_bytes

LIMITS = GuardLimits(max_pixels=1_000_000, max_bytes=1_000_000, deadline=1.5, timeout=3)


def _opener(guard):
    proxies = {"http": guard.url, "https": guard.url, "ftp": guard.url}
    return urllib.request.build_opener(urllib.request.ProxyHandler(proxies))


def _fetch(guard, url: str) -> tuple[str, bytes]:
    """('ok', body) or (error message, b'') as img2dataset would record it."""
    try:
        with _opener(guard).open(url, timeout=LIMITS.timeout) as response:
            return "ok", response.read()
    except (urllib.error.URLError, OSError) as exc:
        return str(exc), b""


@pytest.fixture
def guard():
    with crawl_guard(AddressPolicy(parse_networks(["127.0.0.1/32"])), LIMITS) as server:
        yield server


def _encoded(fmt: str, size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, mode, kwargs", [("PNG", "RGB", {}), ("GIF", "P", {}), ("JPEG", "RGB", {}),
                                               ("WEBP", "RGB", {}), ("WEBP", "RGBA", {})])
def test_image_dimensions_read_from_headers(fmt, mode, kwargs):
    data = _encoded(fmt, (321, 123), mode)
    assert image_dimensions(data) == (321, 123)
    assert image_dimensions(data[:5]) is None
    assert image_dimensions(b"<html>not an image</html>") is None


def test_guard_relays_an_allowed_image(guard):
    with counting_server("127.0.0.1") as a:
        outcome, body = _fetch(guard, f"{a.base}/img.png")
    assert outcome == "ok" and body == png_bytes() and a.requests == ["/img.png"]


def test_redirect_to_a_refused_address_is_checked_at_the_hop(guard):
    with counting_server("127.0.0.1") as a, counting_server("127.0.0.2") as b:
        outcome, _ = _fetch(guard, f"{a.base}/redirect?to={b.base}/img.png")
        direct, _ = _fetch(guard, f"{b.base}/img.png")
        numeric, _ = _fetch(guard, f"http://2130706434:{b.server_address[1]}/img.png")  # 127.0.0.2
    assert guard_reason(outcome) == guard_reason(direct) == guard_reason(numeric) == "loopback address"
    assert "HTTP Error 403" in outcome and "127.0.0.2" in outcome
    assert a.requests == [f"/redirect?to={b.base}/img.png"] and b.requests == []


def test_redirect_to_ftp_or_file_is_refused(guard):
    with counting_server("127.0.0.1") as a, counting_server("127.0.0.2") as b:
        to_ftp, _ = _fetch(guard, f"{a.base}/redirect?to=ftp://127.0.0.2:{b.server_address[1]}/x")
        to_file, _ = _fetch(guard, f"{a.base}/redirect?to=file:///etc/hostname")
    assert guard_reason(to_ftp) == "scheme not http(s)"
    assert "not allowed" in to_file  # urllib itself follows redirects to http, https and ftp only
    assert b.requests == []


def test_pixel_bomb_is_refused_from_its_header(guard):
    with counting_server("127.0.0.1", bomb=one_colour_png(20000, 20000)) as a:
        outcome, body = _fetch(guard, f"{a.base}/bomb.png")
    assert guard_reason(outcome) == "too many pixels" and "20000x20000" in outcome and body == b""


def test_byte_cap(guard):
    with counting_server("127.0.0.1", bomb=b"\0" * (LIMITS.max_bytes + 1)) as a:
        outcome, _ = _fetch(guard, f"{a.base}/bomb.png")
    assert guard_reason(outcome) == "too many bytes"


def test_slow_drip_ends_at_the_deadline_not_the_socket_timeout(guard):
    # 8 bytes a second never leaves a read idle for `timeout`; only the whole-request deadline ends it
    with counting_server("127.0.0.1") as a:
        outcome, _ = _fetch(guard, f"{a.base}/drip")
    assert "HTTP Error 504" in outcome and guard_reason(outcome) == "deadline exceeded"


def test_a_slow_but_live_download_outlasts_the_client_timeout():
    # the guard holds the whole response (to sniff it) for 2 s; its 100 Continue heartbeats keep a
    # client whose timeout is 1 s waiting, the way img2dataset's per-read timeout would
    limits = GuardLimits(max_pixels=1_000_000, max_bytes=1_000_000, deadline=10, timeout=1)
    with crawl_guard(AddressPolicy(parse_networks(["127.0.0.1/32"])), limits) as slow_guard, \
            counting_server("127.0.0.1") as a:
        with _opener(slow_guard).open(f"{a.base}/slow.png", timeout=limits.timeout) as response:
            body = response.read()
    assert body == png_bytes() and slow_guard.counts["relayed"] == 1


def _connect(guard, target: str) -> bytes:
    host, port = guard.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return sock.recv(4096)


def test_connect_is_checked_like_plain_requests(guard):
    with counting_server("127.0.0.2") as b:
        refused = _connect(guard, f"127.0.0.2:{b.server_address[1]}")
        mapped = _connect(guard, f"[::ffff:127.0.0.2]:{b.server_address[1]}")
    assert refused.startswith(b"HTTP/1.1 403 kd3 guard: loopback address")
    assert mapped.startswith(b"HTTP/1.1 403 kd3 guard: loopback address")
    assert b.requests == []


def test_connect_tunnels_to_an_allowed_address(guard):
    with counting_server("127.0.0.1") as a:
        host, port = guard.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(f"CONNECT 127.0.0.1:{a.server_address[1]} HTTP/1.1\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /img.png HTTP/1.0\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(png_bytes()) and a.requests == ["/img.png"]


def test_other_methods_are_refused(guard):
    host, port = guard.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"POST http://127.0.0.1:1/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 405 kd3 guard: method not allowed")


def test_kd3_servers_bind_loopback_without_a_name_lookup(monkeypatch):
    # HTTPServer would call socket.getfqdn: a DNS query for an address /etc/hosts does not list
    import socket as socket_module

    from kd3.data.loopback import LoopbackHTTPServer, serve_directory

    def no_lookup(*args):
        raise AssertionError("name lookup")

    monkeypatch.setattr(socket_module, "getfqdn", no_lookup)
    with crawl_guard(AddressPolicy(parse_networks(["127.0.0.1/32"])), LIMITS) as server:
        assert server.server_name == "127.0.0.1"
    with serve_directory(".") as base:
        assert base.startswith("http://127.0.0.1:")
    with pytest.raises(ValueError, match="loopback addresses only"):
        LoopbackHTTPServer("0.0.0.0", None)
