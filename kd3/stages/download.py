"""download: URL list → webdataset shards + per-shard parquet, with img2dataset.

Outputs in ``RUN/download/``: ``url_list.parquet`` (the list as given, URL column named ``url`` and
normalised, plus uid), ``refused.parquet`` (rows refused before any request: uid, url, reason),
``shards/`` (img2dataset's ``NNNNN.tar``, ``NNNNN.parquet``, ``NNNNN_stats.json``; nothing else,
because img2dataset's resume parses every json there) and ``meta.json`` (counts, failure reasons,
duplicates, the crawl guard's counts). Failed URLs are recorded in the per-shard parquet
(``status``, ``error_message``), never fatal.

Every request goes through :mod:`kd3.data.crawl_guard` (address policy per redirect hop, deadline,
byte and pixel caps); the decoder in img2dataset's workers gets OpenCV's pixel limit as well. That holds
for every ``download.distributor``: pyspark and ray run as a local cluster started in img2dataset's
child process (:mod:`kd3.data.distributors`), so their workers inherit the guard's proxy variables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from kd3 import layout
from kd3.children import run_in_group
from kd3.config import PipelineConfig, require_file, resolve_path
from kd3.data.crawl_guard import GuardLimits, crawl_guard, guard_reason, proxied_environment
from kd3.data.demo import PORT_PLACEHOLDER
from kd3.data.distributors import require
from kd3.data.img2dataset_job import run_img2dataset
from kd3.data.loopback import LOOPBACK, serve_directory
from kd3.data.manifest import read_url_list
from kd3.data.shards import canonicalize_shard, read_download_index, shard_fingerprints, shards_dir
from kd3.data.urls import AddressPolicy, parse_networks
from kd3.errors import ConfigError, Kd3Error
from kd3.progress import Progress
from kd3.runs import StageDir, atomic_path, file_fingerprint

log = logging.getLogger(__name__)

NAME = "download"
SUMMARY = "fetch the URL list with img2dataset into webdataset shards (+ per-shard parquet)"
SECTIONS = ("download",)
#: the stage never runs a model, so run.device is not checked for it
USES_DEVICE = False


def _url_list_path(cfg: PipelineConfig) -> Path:
    return Path(cfg.download.url_list)


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    require(cfg.download.distributor, cfg.source)  # a missing extra, before anything is read or written
    url_list = require_file(cfg, "download.url_list", _url_list_path(cfg),
                            "write one with `kd3 demo-data` or point download.url_list at your URL list")
    read_url_list(url_list, cfg.download.url_column, cfg.download.caption_column,
                  port_placeholder=PORT_PLACEHOLDER)  # its columns and URLs, before the folder is touched
    if cfg.download.serve_root is not None:
        if not resolve_path(cfg.download.serve_root, run_dir).is_dir():
            raise ConfigError(f"{cfg.source}: download.serve_root: folder not found: {cfg.download.serve_root} "
                              "(run `kd3 demo-data` first)")
        if AddressPolicy(parse_networks(cfg.download.allow_networks)).refusal(LOOPBACK) is not None:
            raise ConfigError(f"{cfg.source}: download.serve_root serves on {LOOPBACK}, which the crawl refuses; "
                              f"add \"{LOOPBACK}/32\" to download.allow_networks")
    return {"url_list": file_fingerprint(url_list)}


def _failure_reason(message: Any) -> str:
    """Group img2dataset's error messages into a few readable reasons."""
    text = str(message or "")
    if not text or text == "None":
        return "ok"
    guarded = guard_reason(text)
    if guarded is not None:
        return f"refused: {guarded}" if guarded not in ("timeout", "connection error") else guarded
    lowered = text.lower()
    for needle, reason in (("cv_io_max_image_pixels", "refused: too many pixels"),
                           ("image area too large", "refused: too many pixels"),("404", "http 404"), ("timed out", "timeout"), ("timeout", "timeout"),
                           ("cannot identify image", "not an image"),
                           ("image decoding error", "not an image"), ("opencv", "not an image"), ("image file is truncated", "truncated image"),
                           ("truncated", "truncated image"), ("connection", "connection error"),
                           ("x-robots-tag", "opted out (X-Robots-Tag)")):
        if needle in lowered:
            return reason
    return text.split(":")[0][:60]


def _urls_done(out_dir: Path, seen: dict[str, int]) -> int:
    """URLs in shards finished since the last call (img2dataset writes NNNNN_stats.json when a shard is done)."""
    new = 0
    for stats in out_dir.glob("*_stats.json"):
        if stats.name not in seen:
            try:
                seen[stats.name] = int(json.loads(stats.read_text()).get("count", 0))
            except (OSError, ValueError):
                continue  # being written; read it next time
            new += seen[stats.name]
    return new


@contextlib.contextmanager
def _shard_progress(out_dir: Path, total: int, poll: float = 1.0):
    """Progress lines (URLs done, rate, ETA) from img2dataset's finished shards, polled in a thread."""
    seen: dict[str, int] = {}
    progress = Progress(desc=f"[{NAME}] img2dataset", unit="URLs", total=total, initial=_urls_done(out_dir, seen))
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll):
            progress.update(_urls_done(out_dir, seen))

    thread = threading.Thread(target=watch, name="kd3-download-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        progress.update(_urls_done(out_dir, seen))
        progress.close()


def _img2dataset_options(cfg: PipelineConfig, resolved: Path, out_dir: Path, caption_column: Optional[str],
                         extra_columns: list[str]) -> dict[str, Any]:
    d = cfg.download
    return dict(
        url_list=str(resolved), input_format="parquet", url_col="url", caption_col=caption_column,
        save_additional_columns=extra_columns, output_format="webdataset", output_folder=str(out_dir),
        image_size=d.image_size, resize_mode=d.resize_mode, encode_format=d.encode_format,
        encode_quality=d.resolved_encode_quality, processes_count=d.processes_count, thread_count=d.thread_count,
        number_sample_per_shard=d.number_sample_per_shard, timeout=d.timeout, retries=d.retries,
        distributor=d.distributor, user_agent_token=d.user_agent_token,
        disallowed_header_directives=d.disallowed_header_directives, incremental_mode="incremental",
        max_image_area=d.max_pixels, enable_wandb=False,
    )


def _guard(cfg: PipelineConfig):
    d = cfg.download
    return crawl_guard(AddressPolicy(parse_networks(d.allow_networks)),
                       GuardLimits(max_pixels=d.max_pixels, max_bytes=d.max_bytes, deadline=d.deadline,
                                   timeout=d.timeout))


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    run_dir = out.run_dir
    d = cfg.download
    urls = read_url_list(_url_list_path(cfg), d.url_column, d.caption_column, port_placeholder=PORT_PLACEHOLDER)
    frame = urls.frame
    with atomic_path(out.path / layout.URL_LIST) as tmp:
        frame.to_parquet(tmp, index=False)
    with atomic_path(out.path / layout.REFUSED_URLS) as tmp:
        urls.refused.to_parquet(tmp, index=False)
    dropped = sorted(set(frame.columns) - set(urls.extra_columns) - {"url", urls.caption_column})
    if dropped:
        log.info(f"[{NAME}] columns {dropped} use names img2dataset reserves: kept in "
                 f"{layout.DOWNLOAD}/{layout.URL_LIST} (joined by uid), not in the per-shard parquet")
    templated = frame["url"].str.contains(PORT_PLACEHOLDER, regex=False).any()
    serve_root = d.serve_root
    if templated and serve_root is None:
        raise Kd3Error(f"{d.url_list}: URLs contain {PORT_PLACEHOLDER} but download.serve_root is not set")
    n_shards = math.ceil(len(frame) / d.number_sample_per_shard)
    out_dir = shards_dir(out.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if serve_root is not None:
        serve_root = str(resolve_path(serve_root, run_dir))
    server = serve_directory(serve_root) if serve_root else contextlib.nullcontext(None)
    # OpenCV's own limit, read when img2dataset's spawned workers import cv2: the pixel cap for what
    # the guard cannot sniff (https bodies, unknown formats)
    decoder_limit = {"OPENCV_IO_MAX_IMAGE_PIXELS": str(d.max_pixels)}
    if d.distributor != "multiprocessing":
        log.info(f"[{NAME}] distributor {d.distributor}: a local cluster on this machine with {d.processes_count} "
                 "worker(s), every one behind the crawl guard")
    with server as base_url, _guard(cfg) as guard, proxied_environment(guard.url, decoder_limit):
        resolved = frame[[c for c in frame.columns if c in {"url", urls.caption_column, *urls.extra_columns}]].copy()
        if base_url is not None:
            port = base_url.rsplit(":", 1)[1]
            resolved["url"] = resolved["url"].str.replace(PORT_PLACEHOLDER, port, regex=False)
            log.info(f"[{NAME}] serving {serve_root} at {base_url} (loopback only)")
        # img2dataset reads the list from a file; keep it outside shards/ (its resume parses that folder)
        resolved_path = out.path / ".url_list_resolved.parquet"
        with atomic_path(resolved_path) as tmp:
            resolved.to_parquet(tmp, index=False)
        log.info(f"[{NAME}] downloading {len(frame)} URLs into {n_shards} shard(s) with img2dataset "
                 f"through the crawl guard at {guard.url} …")
        with _shard_progress(out_dir, len(frame)):
            # in a child process group, so img2dataset's workers die with this stage (kill -9 included)
            options = _img2dataset_options(cfg, resolved_path, out_dir, urls.caption_column, list(urls.extra_columns))
            run_in_group("img2dataset", run_img2dataset, options, str(out.path / "img2dataset.log"))
        resolved_path.unlink(missing_ok=True)
        guard_counts = dict(sorted(guard.counts.items()))
    done = len(list(out_dir.glob("*_stats.json")))
    if done < n_shards:
        raise Kd3Error(f"img2dataset finished {done}/{n_shards} shards in {out_dir} (see {out.path / 'img2dataset.log'}); "
                       f"rerun with --resume to fetch the rest")
    for shard in sorted(out_dir.glob("*.tar")):
        canonicalize_shard(shard)  # deterministic sample order, whatever order downloads finished in
    out.write_meta(outputs={"shards": shard_fingerprints(out.path)})  # later stages refuse changed shards
    index = read_download_index(out.path, columns=["uid", "url", "status", "error_message"])
    # report template URLs (stable, port-free) so later stages and manifests never show a dead port
    index["url"] = index["uid"].map(dict(zip(frame["uid"], frame["url"])))
    failed = index.loc[index["status"] != "success", "error_message"].map(_failure_reason)
    reasons = pd.concat([failed, urls.refused["reason"].map(lambda r: f"refused: {r}")]).value_counts()
    n_ok = int((index["status"] == "success").sum())
    duplicates = {"url": urls.duplicate_urls, "uid": urls.duplicate_uids}
    log.info(f"[{NAME}] ok {n_ok}, failed {len(index) - n_ok} of {len(index)}"
             + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())})" if len(reasons) else "")
             + (f"; refused before download {len(urls.refused)}" if len(urls.refused) else "")
             + (f"; duplicates dropped: {duplicates}" if any(duplicates.values()) else ""))
    return {"urls": len(frame), "ok": n_ok, "failed": int(len(index) - n_ok), "shards": n_shards,
            "refused_before_download": len(urls.refused), "duplicates": duplicates,
            "failures_by_reason": {str(k): int(v) for k, v in reasons.items()}, "guard": guard_counts}
