"""The crawl guard's own cost: every URL of a demo run's list fetched from the demo's loopback file
server directly, then through the guard (16 client threads, as img2dataset's thread_count), in
one process; with --profile, cProfile of the guard's request handlers (top functions by own time).

Usage: python benchmarks/guard_overhead.py [--run-dir runs/perf/base] [--profile] [--top 12]
(``benchmarks/perf.py`` makes the base run.) Target 6 of BENCHMARKS.md times the whole download stage;
this isolates the proxy. Loopback only: the server and the guard bind 127.0.0.1 and the policy
allows nothing else.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import cProfile
import io
import pstats
import threading
import time
import urllib.request
from pathlib import Path

from kd3 import layout
from kd3.data import crawl_guard as guard_module
from kd3.data.crawl_guard import GuardLimits, crawl_guard
from kd3.data.demo import PORT_PLACEHOLDER
from kd3.data.loopback import serve_directory
from kd3.data.manifest import read_url_list
from kd3.data.urls import AddressPolicy, parse_networks


def fetch_all(urls: list[str], opener: urllib.request.OpenerDirector, threads: int = 16) -> tuple[float, int]:
    """Seconds to fetch every URL, and how many failed."""
    def one(url: str) -> bool:
        try:
            with opener.open(url, timeout=10) as response:
                response.read()
            return True
        except OSError:
            return False

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        ok = list(pool.map(one, urls))
    return time.perf_counter() - started, ok.count(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/perf/base"))
    parser.add_argument("--profile", action="store_true", help="cProfile the guard's request handlers")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    listed = read_url_list(args.run_dir / layout.DOWNLOAD / layout.URL_LIST, None, None,
                           port_placeholder=PORT_PLACEHOLDER).frame["url"].tolist()
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    if args.profile:
        handle = guard_module._GuardHandler.handle

        def profiled(self) -> None:
            profile = cProfile.Profile()
            profile.runcall(handle, self)
            with lock:
                profiles.append(profile)

        guard_module._GuardHandler.handle = profiled
    with serve_directory(args.run_dir / "demo-data" / "web") as base_url:
        port = base_url.rsplit(":", 1)[1]
        urls = [u.replace(PORT_PLACEHOLDER, port) for u in listed]
        direct, failed_direct = fetch_all(urls, urllib.request.build_opener(urllib.request.ProxyHandler({})))
        limits = GuardLimits(max_pixels=16_777_216, max_bytes=16_777_216, deadline=20.0, timeout=3)
        with crawl_guard(AddressPolicy(parse_networks(["127.0.0.1/32"])), limits) as guard:
            proxied = urllib.request.build_opener(urllib.request.ProxyHandler({"http": guard.url}))
            through, failed_guard = fetch_all(urls, proxied)
    if profiles:
        stats = pstats.Stats(profiles[0], stream=(out := io.StringIO()))
        for profile in profiles[1:]:
            stats.add(profile)
        stats.sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())
    print(f"{len(urls)} loopback URLs, 16 threads: direct {direct:.2f} s ({failed_direct} failed), "
          f"through the guard {through:.2f} s ({failed_guard} failed): ratio {through / direct:.2f}")


if __name__ == "__main__":
    main()
