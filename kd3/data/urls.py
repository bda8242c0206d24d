"""Crawl URLs: normalisation (scheme, IDNA host, numeric IPv4 forms, percent-encoding) and the address
policy that keeps a crawl off private networks.

Both are pure functions of their inputs (the resolver is passed in), so they are tested on address
values and stubbed resolvers, never on the wire. :mod:`kd3.data.crawl_guard` applies them to every
request img2dataset makes, redirects included.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union
from urllib.parse import quote, urlsplit, urlunsplit

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: the only schemes a crawl fetches (file://, ftp://, data: … are refused before any request)
ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
#: characters left as they are in a path or query (RFC 3986 reserved + unreserved, and "%")
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: NAT64's well-known prefix carries an IPv4 address in its last 32 bits
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class UrlRefused(ValueError):
    """A URL the crawl will not fetch; ``reason`` is one of a few fixed, countable phrases."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_numeric_ipv4(host: str) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address a numeric host spells, in any form a URL parser or ``inet_aton`` accepts.

    ``2130706433``, ``0x7f000001``, ``0177.0.0.1`` and ``127.1`` all name 127.0.0.1 (WHATWG URL
    standard, IPv4 parser): 1–4 dot-separated parts, each decimal, ``0x`` hex or ``0``-prefixed octal,
    the last part filling the remaining bytes. None when ``host`` is not such a number.
    """
    parts = host.split(".")
    if parts and parts[-1] == "":
        parts = parts[:-1]  # one trailing dot is allowed
    if not parts or len(parts) > 4:
        return None
    numbers = []
    for part in parts:
        try:
            if part.lower().startswith("0x"):
                numbers.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                numbers.append(int(part, 8))
            elif part.isdigit():
                numbers.append(int(part, 10))
            else:
                return None
        except ValueError:
            return None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def canonical_host(host: str) -> str:
    """Lower-case ASCII host: IDNA for names, dotted quad for numeric IPv4, compressed IPv6 (no brackets)."""
    host = host.strip().rstrip(".").lower()
    if not host:
        raise UrlRefused("bad url", "no host")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host.split("%", 1)[0]))
        except ValueError:
            raise UrlRefused("bad url", f"bad IPv6 host {host!r}") from None
    numeric = parse_numeric_ipv4(host)
    if numeric is not None:
        return str(numeric)
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise UrlRefused("bad url", f"host {host!r} is not a valid IDNA name") from None
    if not re.fullmatch(r"[a-z0-9._-]+", ascii_host):
        raise UrlRefused("bad url", f"host {host!r} has characters a host may not have")
    return ascii_host


def _encode(part: str, safe: str) -> str:
    return quote(_LONE_PERCENT.sub("%25", part), safe=safe)


def normalize_url(url: str, port_placeholder: Optional[str] = None) -> str:
    """The URL as the crawl fetches it: http(s) only, canonical host, default port dropped, spaces and
    non-ASCII in path and query percent-encoded (existing ``%XX`` kept), fragment dropped.

    Idempotent: a normalised URL normalises to itself. ``port_placeholder`` (e.g. ``{port}``) may stand
    for the port, for URL lists whose port is filled in at download time. Raises :class:`UrlRefused`.
    """
    text = str(url).strip()
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise UrlRefused("bad url", str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise UrlRefused("scheme not http(s)", f"{scheme or 'none'}:")
    netloc = parts.netloc
    userinfo, _, hostport = netloc.rpartition("@")
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        host, port = f"[{host}]", rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = hostport.partition(":")
    host = canonical_host(host)
    if port_placeholder is not None and port == port_placeholder:
        pass
    elif port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UrlRefused("bad url", f"bad port {port!r}")
        port = "" if int(port) == DEFAULT_PORTS[scheme] else str(int(port))
    shown_host = f"[{host}]" if ":" in host else host
    netloc = (f"{_encode(userinfo, '%:!$&()*+,;=-._~')}@" if userinfo else "") + shown_host + (f":{port}" if port else "")
    path = _encode(parts.path, _PATH_SAFE) or "/"
    return urlunsplit((scheme, netloc, path, _encode(parts.query, _QUERY_SAFE), ""))


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(str(v).strip(), strict=False) for v in values)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, Teredo client, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> Optional[str]:
    """Why the crawl must not connect to ``address`` (None: it may). ``allowed`` networks are exempt.

    Refused: loopback, private (RFC 1918, ULA, …), link-local, multicast, reserved, unspecified and
    any other non-global range (CGNAT 100.64/10, documentation nets, …); an IPv6 address carrying an
    IPv4 one (mapped, 6to4, Teredo, NAT64) is judged by the IPv4 address too.
    """
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0])
    if any(address.version == net.version and address in net for net in allowed):
        return None
    if address.version == 6:
        inner = _embedded_ipv4(address)
        if inner is not None:
            why = address_refusal(inner, allowed)
            if why is not None:
                return why
            if address.ipv4_mapped is not None:
                return None  # ::ffff:a.b.c.d is a.b.c.d
    for attribute, reason in (("is_unspecified", "unspecified address"), ("is_loopback", "loopback address"),
                              ("is_link_local", "link-local address"), ("is_multicast", "multicast address"),
                              ("is_reserved", "reserved address"), ("is_private", "private address")):
        if getattr(address, attribute):
            return reason
    if not address.is_global:
        return "non-global address"
    return None


Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (IP literals are returned without a lookup)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a crawl may connect to: every global address, plus ``allowed`` networks."""

    allowed: tuple[IPNetwork, ...] = ()
    resolver: Resolver = field(default=system_resolver, compare=False)

    def refusal(self, address: str) -> Optional[str]:
        """Why ``address`` (an IP literal) is refused, or None."""
        return address_refusal(ipaddress.ip_address(address), self.allowed)

    def check_host(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``; raises :class:`UrlRefused` when any resolved address
        is refused (so a name resolving to one public and one private address is refused too)."""
        host = canonical_host(host)
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                addresses = self.resolver(host, port)
            except (OSError, UnicodeError) as exc:
                raise UrlRefused("cannot resolve host", f"{host}: {exc}") from None
        if not addresses:
            raise UrlRefused("cannot resolve host", host)
        for address in addresses:
            why = address_refusal(ipaddress.ip_address(address.split("%", 1)[0]), self.allowed)
            if why is not None:
                raise UrlRefused(why, address if host == address else f"{host} -> {address}")
        return addresses
