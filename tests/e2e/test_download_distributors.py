"""`kd3 download` with img2dataset's pyspark and ray distributors (Spark local mode, one-node Ray) on a
loopback pool: the same shards, uids, statuses and per-shard stats as the multiprocessing distributor,
every request through the crawl guard, and --resume. Each runs when its extra is installed
(`kd3[spark]`, `kd3[ray]`). Servers bind 127.0.0.1 / 127.0.0.2; nothing else is ever contacted."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kd3.cli import main
from kd3.data import distributors
from kd3.data.urls import AddressPolicy
from kd3.stages import download
from tests.zoo.crawl_servers import counting_server

pytestmark = pytest.mark.slow

IMAGES, MISSING, SHARD = 20, 2, 8
#: stats fields that do not depend on timing
STATS = ("count", "successes", "failed_to_download", "failed_to_resize", "status_dict")
#: what Ray's dashboard process asks when it starts (cloud detection: 169.254.169.254 twice and
#: metadata.google.internal), through the guard like every request of the cluster's processes, refused there
RAY_PROBES = {"link-local address", "cannot resolve host"}


def _names_never_resolved(host: str, port: int) -> list[str]:
    raise OSError(f"{host}: the tests resolve no names (a lookup would query the system's resolver)")


def _pool(a, b) -> list[str]:
    """20 images and two 404s on A (allowed), one URL on B (127.0.0.2, not allowed) and one redirect to it."""
    urls = [f"{a.base}/img-{i}.png" for i in range(IMAGES)] + [f"{a.base}/missing-{i}" for i in range(MISSING)]
    return urls + [f"{b.base}/img-direct.png", f"{a.base}/redirect?to={b.base}/img-redirected.png"]


def _download(tmp_path: Path, name: str, urls: list[str], distributor: str, *extra: str) -> int:
    url_list = tmp_path / "urls.txt"
    url_list.write_text("".join(f"{u}\n" for u in urls))
    config = tmp_path / "crawl.yaml"
    config.write_text(yaml.safe_dump({"download": {
        "url_list": str(url_list), "image_size": 16, "processes_count": 2, "thread_count": 4,
        "number_sample_per_shard": SHARD, "timeout": 3, "deadline": 2, "allow_networks": ["127.0.0.1/32"],
        "distributor": distributor}}))
    return main(["download", "--config", str(config), "--run-dir", str(tmp_path / name), "-q", *extra])


def _result(run: Path) -> dict:
    """What must not depend on the distributor: per shard its uids with status, stats and tar members."""
    shards = run / "download" / "shards"
    out = {}
    for parquet in sorted(shards.glob("*.parquet")):
        index = pd.read_parquet(parquet).sort_values("uid")
        stats = json.loads((shards / f"{parquet.stem}_stats.json").read_text())
        with tarfile.open(shards / f"{parquet.stem}.tar") as tar:
            members = [m.name for m in tar.getmembers()]
        out[parquet.stem] = {"samples": list(zip(index["uid"], index["status"])),
                             "stats": {k: stats[k] for k in STATS}, "members": members}
    counts = json.loads((run / "download" / "meta.json").read_text())["counts"]
    return {"shards": out, **{k: counts[k] for k in ("urls", "ok", "failed", "shards", "failures_by_reason", "guard")}}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """(servers A and B, URLs, the multiprocessing result) for the module."""
    tmp = tmp_path_factory.mktemp("pool")
    with pytest.MonkeyPatch.context() as patch, counting_server("127.0.0.1") as a, counting_server("127.0.0.2") as b:
        # the guard resolves host names itself; Ray's probe of metadata.google.internal must not reach DNS
        patch.setattr(download, "AddressPolicy", lambda allowed: AddressPolicy(allowed, _names_never_resolved))
        urls = _pool(a, b)
        assert _download(tmp, "run", urls, "multiprocessing") == 0
        baseline = _result(tmp / "run")
        a.requests.clear()
        yield a, b, urls, baseline
    assert b.requests == []  # 127.0.0.2 is not allowed: never reached under any distributor


def _baseline_is_what_the_pool_holds(baseline: dict) -> None:
    assert baseline["urls"] == IMAGES + MISSING + 2 and baseline["ok"] == IMAGES and baseline["shards"] == 3
    assert baseline["failures_by_reason"] == {"http 404": MISSING, "refused: loopback address": 2}
    # every request went through the guard: 22 relayed to A, the two to B refused there
    assert baseline["guard"] == {"loopback address": 2, "relayed": IMAGES + MISSING + 1}


def _without_ray_probes(result: dict, distributor: str) -> None:
    probes = {k: result["guard"].pop(k) for k in RAY_PROBES & set(result["guard"])}
    if distributor != "ray":
        assert probes == {}  # nothing but the pool's URLs came through the guard


@pytest.mark.parametrize("distributor, module", [("pyspark", "pyspark"), ("ray", "ray")])
def test_distributor_gives_the_multiprocessing_shards_through_the_guard_and_resumes(tmp_path, pool, distributor,
                                                                                   module):
    pytest.importorskip(module)
    if distributor == "pyspark" and distributors.java() is None:
        pytest.skip("pyspark needs Java; none found ($JAVA_HOME/bin/java or java on PATH)")
    a, b, urls, baseline = pool
    _baseline_is_what_the_pool_holds(baseline)
    a.requests.clear()
    assert _download(tmp_path, "run", urls, distributor) == 0
    result = _result(tmp_path / "run")
    _without_ray_probes(result, distributor)
    assert result == baseline
    assert sorted(a.requests) == sorted(u.split(a.base, 1)[1] for u in urls if u.startswith(a.base))
    assert b.requests == []

    # an interrupted run: the last shard missing, meta.json not complete; --resume fetches only that shard
    run = tmp_path / "run"
    meta_path = run / "download" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "status": "failed"}))
    for path in (run / "download" / "shards").glob("00002*"):
        path.unlink()
    a.requests.clear()
    assert _download(tmp_path, "run", urls, distributor, "--resume") == 0
    assert sorted(a.requests) == sorted(u.split(a.base, 1)[1] for u in urls[2 * SHARD:] if u.startswith(a.base))
    resumed = _result(run)
    _without_ray_probes(resumed, distributor)
    # the guard counts only what this run fetched; everything else is as before
    assert resumed.pop("guard") == {"loopback address": 2, "relayed": len(urls) - 2 * SHARD - 1}
    assert resumed == {k: v for k, v in baseline.items() if k != "guard"}
