"""`kd3 download` end to end on a LAION-style crawl list, against the crawl's holes (issue 15):
file:// URLs, private and loopback addresses (directly and behind a redirect), pixel bombs, slow-drip
servers, duplicates, raw spaces and non-ASCII. Every server binds 127.0.0.x; loopback itself is the
"private network" here, allowed only where a test says so."""

from __future__ import annotations

import json
import tarfile

import pandas as pd
import pytest
import yaml

from kd3.cli import main
from tests.zoo.crawl_servers import counting_server, one_colour_png

pytestmark = pytest.mark.slow


def _download(tmp_path, url_list, **download) -> dict:
    config = tmp_path / "crawl.yaml"
    settings = {"url_list": str(url_list), "image_size": 16, "thread_count": 4, "number_sample_per_shard": 100,
                "timeout": 3, "deadline": 2, "max_pixels": 4_000_000, **download}
    config.write_text(yaml.safe_dump({"download": settings}))
    run_dir = tmp_path / "run"
    assert main(["download", "--config", str(config), "--run-dir", str(run_dir)]) == 0
    return json.loads((run_dir / "download" / "meta.json").read_text())["counts"]


def _shard_index(tmp_path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "run/download/shards").glob("*.parquet"))])


def _laion_row(url: str, text: str, i: int) -> dict:
    return {"URL": url, "TEXT": text, "WIDTH": 24, "HEIGHT": 16, "similarity": 0.3 + i / 100,
            "LICENSE": "?", "NSFW": "UNLIKELY", "sha256": f"{i:064x}"}


def test_laion_list_downloads_with_captions_and_every_hole_closed(tmp_path):
    with counting_server("127.0.0.1", bomb=one_colour_png(20000, 20000)) as a, counting_server("127.0.0.2") as b:
        port_b = b.server_address[1]
        urls = {
            "ok": f"{a.base}/img-ok.png",
            "spaces": f"{a.base}/img dir/bild ä.png",           # fetched as /img%20dir/bild%20%C3%A4.png
            "numeric host": f"http://2130706433:{a.server_address[1]}/img-numeric.png",
            "file": "file:///etc/hostname",
            "ftp": f"ftp://127.0.0.2:{port_b}/img.png",
            "loopback": f"{b.base}/img-direct.png",
            "redirect": f"{a.base}/redirect?to={b.base}/img-redirected.png",
            "drip": f"{a.base}/drip",
            "bomb": f"{a.base}/bomb.png",
        }
        rows = [_laion_row(url, f"caption of {name}", i) for i, (name, url) in enumerate(urls.items())]
        rows.append(_laion_row(urls["ok"], "same URL again", 99))
        rows.append(_laion_row(f"{a.base}/img%20dir/bild%20%C3%A4.png", "same URL, encoded", 98))
        pd.DataFrame(rows).to_parquet(tmp_path / "laion.parquet")
        counts = _download(tmp_path, tmp_path / "laion.parquet", allow_networks=["127.0.0.1/32"])
        assert b.requests == []  # 127.0.0.2 is not allowed: never reached, directly or behind a redirect
        assert sorted(a.requests) == sorted(["/img-ok.png", "/img%20dir/bild%20%C3%A4.png", "/img-numeric.png",
                                             f"/redirect?to={b.base}/img-redirected.png", "/drip", "/bomb.png"])

    assert counts["urls"] == 7 and counts["ok"] == 3 and counts["refused_before_download"] == 2
    assert counts["duplicates"] == {"url": 2, "uid": 0}
    assert counts["failures_by_reason"] == {"refused: scheme not http(s)": 2, "refused: loopback address": 2,
                                            "refused: deadline exceeded": 1, "refused: too many pixels": 1}
    index = _shard_index(tmp_path).set_index("caption")
    assert index.loc["caption of ok", "status"] == "success"
    assert index.loc["caption of spaces", "url"].endswith("/img%20dir/bild%20%C3%A4.png")
    assert index.loc["caption of redirect", "error_message"].startswith("HTTP Error 403: kd3 guard: loopback address")
    assert index.loc["caption of bomb", "status"] == "failed_to_download"
    assert {"WIDTH", "HEIGHT", "similarity", "LICENSE", "NSFW", "uid"} <= set(index.columns)  # carried along
    assert index.loc["caption of ok", "similarity"] == pytest.approx(0.30)
    # the caption is each sample's .txt in the shards; sha256 (an img2dataset name) stays in url_list.parquet
    with tarfile.open(tmp_path / "run/download/shards/00000.tar") as tar:
        texts = {tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}
    assert texts == {"caption of ok", "caption of spaces", "caption of numeric host"}
    url_list = pd.read_parquet(tmp_path / "run/download/url_list.parquet")
    assert {"url", "uid", "TEXT", "sha256"} <= set(url_list.columns) and len(url_list) == 7
    refused = pd.read_parquet(tmp_path / "run/download/refused.parquet")
    assert sorted(refused["url"]) == sorted([urls["file"], urls["ftp"]])


def test_without_allow_networks_loopback_receives_nothing(tmp_path):
    with counting_server("127.0.0.1") as a:
        pd.DataFrame({"url": [f"{a.base}/img-1.png",
                              f"http://[::1]:{a.server_address[1]}/img-3.png"]}).to_csv(tmp_path / "urls.csv")
        counts = _download(tmp_path, tmp_path / "urls.csv")
        assert a.requests == []
    assert counts["ok"] == 0 and counts["failures_by_reason"] == {"refused: loopback address": 2}


def test_demo_config_without_loopback_allowed_is_refused_up_front(tmp_path, capsys):
    (tmp_path / "web").mkdir()
    pd.DataFrame({"url": ["http://127.0.0.1:{port}/a.png"]}).to_parquet(tmp_path / "urls.parquet")
    config = tmp_path / "crawl.yaml"
    config.write_text(yaml.safe_dump({"download": {"url_list": str(tmp_path / "urls.parquet"),
                                                   "serve_root": str(tmp_path / "web")}}))
    assert main(["download", "--config", str(config), "--run-dir", str(tmp_path / "run")]) != 0
    assert "download.allow_networks" in capsys.readouterr().err
