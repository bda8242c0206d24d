"""The crawl's address policy and URL normalisation, on address values and a stubbed resolver only
(no test here opens a connection or asks a DNS server anything)."""

from __future__ import annotations

import ipaddress

import pytest

from kd3.data.urls import AddressPolicy, UrlRefused, address_refusal, normalize_url, parse_networks, \
    parse_numeric_ipv4


@pytest.mark.parametrize("address, reason", [
    ("10.1.2.3", "private address"),
    ("172.16.0.1", "private address"),
    ("172.31.255.254", "private address"),
    ("192.168.0.1", "private address"),
    ("169.254.169.254", "link-local address"),  # cloud metadata
    ("127.0.0.1", "loopback address"),
    ("127.8.9.10", "loopback address"),
    ("0.0.0.0", "unspecified address"),
    ("100.64.0.1", "non-global address"),  # carrier-grade NAT
    ("224.0.0.1", "multicast address"),
    ("240.0.0.1", "reserved address"),
    ("255.255.255.255", "reserved address"),
    ("::1", "loopback address"),
    ("::", "unspecified address"),
    ("fe80::1", "link-local address"),
    ("fc00::1", "private address"),
    ("ff02::1", "multicast address"),
    ("::ffff:127.0.0.1", "loopback address"),  # IPv4-mapped
    ("::ffff:10.0.0.1", "private address"),
    ("2002:a00:1::1", "private address"),  # 6to4 of 10.0.0.1
    ("64:ff9b::a9fe:a9fe", "link-local address"),  # NAT64 of 169.254.169.254
    ("8.8.8.8", None),
    ("172.32.0.1", None),
    ("::ffff:8.8.8.8", None),
    ("2606:4700:4700::1111", None),
])
def test_address_refusal_golden(address, reason):
    assert address_refusal(ipaddress.ip_address(address)) == reason


def test_allowed_networks_exempt_only_themselves():
    allowed = parse_networks(["127.0.0.1/32"])
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), allowed) is None
    assert address_refusal(ipaddress.ip_address("127.0.0.2"), allowed) == "loopback address"
    assert address_refusal(ipaddress.ip_address("::ffff:127.0.0.1"), allowed) is None  # the same address
    assert address_refusal(ipaddress.ip_address("::1"), allowed) == "loopback address"


@pytest.mark.parametrize("host, address", [
    ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"), ("10.1", "10.0.0.1"), ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("3232235521", "192.168.0.1"), ("1.2.3.4.", "1.2.3.4"), ("0x", "0.0.0.0"),  # WHATWG: empty hex is 0
])
def test_numeric_hosts_are_read_as_ipv4(host, address):
    assert str(parse_numeric_ipv4(host)) == address


@pytest.mark.parametrize("host", ["example.com", "4294967296", "1.2.3.4.5", "256.1.1.1", "08.1.1.1", "1e3"])
def test_names_and_overflowing_numbers_are_not_ipv4(host):
    assert parse_numeric_ipv4(host) is None


class StubResolver:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table, self.asked = table, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.table:
            raise OSError("name not known")
        return self.table[host]


def test_policy_resolves_names_and_refuses_any_private_answer():
    resolver = StubResolver({"public.test": ["93.184.216.34"], "mixed.test": ["93.184.216.34", "10.0.0.7"],
                             "rebind.test": ["::ffff:192.168.1.1"], "v6.test": ["2606:4700::1"]})
    policy = AddressPolicy((), resolver)
    assert policy.check_host("public.test", 80) == ["93.184.216.34"]
    assert policy.check_host("V6.Test.", 443) == ["2606:4700::1"]
    with pytest.raises(UrlRefused) as err:
        policy.check_host("mixed.test", 80)
    assert err.value.reason == "private address" and "10.0.0.7" in str(err.value)
    with pytest.raises(UrlRefused, match="private address"):
        policy.check_host("rebind.test", 80)
    with pytest.raises(UrlRefused) as err:
        policy.check_host("unknown.test", 80)
    assert err.value.reason == "cannot resolve host"


def test_policy_judges_ip_literals_without_the_resolver():
    resolver = StubResolver({})
    policy = AddressPolicy((), resolver)
    for host, reason in (("2130706433", "loopback address"), ("[::1]", "loopback address"),
                         ("169.254.169.254", "link-local address"), ("0x0a000001", "private address")):
        with pytest.raises(UrlRefused) as err:
            policy.check_host(host, 80)
        assert err.value.reason == reason
    assert policy.check_host("8.8.8.8", 80) == ["8.8.8.8"]
    assert resolver.asked == []


@pytest.mark.parametrize("url, expected", [
    ("http://example.com/a b.png", "http://example.com/a%20b.png"),
    ("HTTP://EXAMPLE.com:80/x?q=a b&r=ü#frag", "http://example.com/x?q=a%20b&r=%C3%BC"),
    ("https://bücher.example/bild ä.jpg", "https://xn--bcher-kva.example/bild%20%C3%A4.jpg"),
    ("https://example.com:443", "https://example.com/"),
    ("http://example.com:8080/%7Euser/100%/x%2Fy", "http://example.com:8080/%7Euser/100%25/x%2Fy"),
    ("http://2130706433/x", "http://127.0.0.1/x"),
    ("http://[::FFFF:7F00:1]:81/", "http://[::ffff:7f00:1]:81/"),
    ("  http://example.com/ok  ", "http://example.com/ok"),
    ("http://127.0.0.1:{port}/mnist/00001.png", "http://127.0.0.1:{port}/mnist/00001.png"),
])
def test_normalize_url_golden_and_idempotent(url, expected):
    assert normalize_url(url, port_placeholder="{port}") == expected
    assert normalize_url(expected, port_placeholder="{port}") == expected


@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "scheme not http(s)"), ("ftp://example.com/x", "scheme not http(s)"),
    ("data:image/png;base64,AAAA", "scheme not http(s)"), ("javascript:alert(1)", "scheme not http(s)"),
    ("example.com/x.png", "scheme not http(s)"), ("http:///nohost", "bad url"),
    ("http://exa mple.com/", "bad url"), ("http://example.com:99999/", "bad url"),
])
def test_normalize_url_refuses(url, reason):
    with pytest.raises(UrlRefused) as err:
        normalize_url(url)
    assert err.value.reason == reason
