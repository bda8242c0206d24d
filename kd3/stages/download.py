"""download: URL list → webdataset shards + per-shard parquet, with img2dataset.

Outputs in ``RUN/download/``: ``url_list.parquet`` (the list as given, plus uid), ``shards/``
(img2dataset's ``NNNNN.tar``, ``NNNNN.parquet``, ``NNNNN_stats.json``; nothing else, because
img2dataset's resume parses every json there) and ``meta.json`` (counts, failure reasons).
Failed URLs are recorded in the per-shard parquet (``status``, ``error_message``), never fatal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any

from kd3 import layout
from kd3.children import run_in_group
from kd3.config import PipelineConfig, require_file, resolve_path
from kd3.data.demo import PORT_PLACEHOLDER
from kd3.data.loopback import serve_directory
from kd3.data.manifest import read_url_list
from kd3.data.shards import canonicalize_shard, read_download_index, shard_fingerprints, shards_dir
from kd3.errors import ConfigError, Kd3Error
from kd3.progress import Progress
from kd3.runs import StageDir, atomic_path, capture_stdout, file_fingerprint

log = logging.getLogger(__name__)

NAME = "download"
SUMMARY = "fetch the URL list with img2dataset into webdataset shards (+ per-shard parquet)"
SECTIONS = ("download",)
#: the stage never runs a model, so run.device is not checked for it
USES_DEVICE = False


def _url_list_path(cfg: PipelineConfig) -> Path:
    return Path(cfg.download.url_list)


def check(cfg: PipelineConfig, run_dir: Path) -> dict[str, str]:
    url_list = require_file(cfg, "download.url_list", _url_list_path(cfg),
                            "write one with `kd3 demo-data` or point download.url_list at your URL list")
    read_url_list(url_list)  # its columns and URLs, before the folder is touched (and in --dry-run)
    if cfg.download.serve_root is not None and not resolve_path(cfg.download.serve_root, run_dir).is_dir():
        raise ConfigError(f"{cfg.source}: download.serve_root: folder not found: {cfg.download.serve_root} "
                          "(run `kd3 demo-data` first)")
    return {"url_list": file_fingerprint(url_list)}


def _failure_reason(message: Any) -> str:
    """Group img2dataset's error messages into a few readable reasons."""
    text = str(message or "")
    if not text or text == "None":
        return "ok"
    lowered = text.lower()
    for needle, reason in (("404", "http 404"), ("timed out", "timeout"), ("timeout", "timeout"),
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


def _bar_into(buffer):
    """img2dataset's shard counter (a tqdm bar on stderr) into ``buffer`` when stderr is not a terminal,
    where it would be a run of carriage returns; kd3's own progress lines say the same there."""
    return contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(buffer)


def _download(cfg: PipelineConfig, resolved: Path, out_dir: Path, extra_columns: list[str]) -> str:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise calls home
    from img2dataset import download

    d = cfg.download
    with capture_stdout() as printed, _bar_into(printed):
        download(
            url_list=str(resolved), input_format="parquet", url_col="url",
            save_additional_columns=extra_columns, output_format="webdataset", output_folder=str(out_dir),
            image_size=d.image_size, resize_mode=d.resize_mode, encode_format=d.encode_format,
            encode_quality=d.resolved_encode_quality, processes_count=d.processes_count, thread_count=d.thread_count,
            number_sample_per_shard=d.number_sample_per_shard, timeout=d.timeout, retries=d.retries,
            distributor=d.distributor, user_agent_token=d.user_agent_token,
            disallowed_header_directives=d.disallowed_header_directives, incremental_mode="incremental",
            enable_wandb=False,
        )
    return printed.getvalue()


def _download_to_log(cfg: PipelineConfig, resolved: Path, out_dir: Path, extra_columns: list[str], log: Path) -> None:
    log.write_text(_download(cfg, resolved, out_dir, extra_columns))


def run(cfg: PipelineConfig, out: StageDir) -> dict[str, Any]:
    run_dir = out.run_dir
    urls = read_url_list(_url_list_path(cfg))
    with atomic_path(out.path / layout.URL_LIST) as tmp:
        urls.to_parquet(tmp, index=False)
    templated = urls["url"].str.contains(PORT_PLACEHOLDER, regex=False).any()
    serve_root = cfg.download.serve_root
    if templated and serve_root is None:
        raise Kd3Error(f"{cfg.download.url_list}: URLs contain {PORT_PLACEHOLDER} but download.serve_root is not set")
    n_shards = math.ceil(len(urls) / cfg.download.number_sample_per_shard)
    out_dir = shards_dir(out.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra_columns = [c for c in urls.columns if c != "url"]
    if serve_root is not None:
        serve_root = str(resolve_path(serve_root, run_dir))
    server = serve_directory(serve_root) if serve_root else contextlib.nullcontext(None)
    with server as base_url:
        resolved = urls.copy()
        if base_url is not None:
            port = base_url.rsplit(":", 1)[1]
            resolved["url"] = resolved["url"].str.replace(PORT_PLACEHOLDER, port, regex=False)
            log.info(f"[{NAME}] serving {serve_root} at {base_url} (loopback only)")
        # img2dataset reads the list from a file; keep it outside shards/ (its resume parses that folder)
        resolved_path = out.path / ".url_list_resolved.parquet"
        with atomic_path(resolved_path) as tmp:
            resolved.to_parquet(tmp, index=False)
        log.info(f"[{NAME}] downloading {len(urls)} URLs into {n_shards} shard(s) with img2dataset …")
        with _shard_progress(out_dir, len(urls)):
            # in a child process group, so img2dataset's workers die with this stage (kill -9 included)
            run_in_group("img2dataset", _download_to_log, cfg, resolved_path, out_dir, extra_columns,
                         out.path / "img2dataset.log")
        resolved_path.unlink(missing_ok=True)
    done = len(list(out_dir.glob("*_stats.json")))
    if done < n_shards:
        raise Kd3Error(f"img2dataset finished {done}/{n_shards} shards in {out_dir} (see {out.path / 'img2dataset.log'}); "
                       f"rerun with --resume to fetch the rest")
    for shard in sorted(out_dir.glob("*.tar")):
        canonicalize_shard(shard)  # deterministic sample order, whatever order downloads finished in
    out.write_meta(outputs={"shards": shard_fingerprints(out.path)})  # later stages refuse changed shards
    index = read_download_index(out.path, columns=["uid", "url", "status", "error_message"])
    # report template URLs (stable, port-free) so later stages and manifests never show a dead port
    index["url"] = index["uid"].map(dict(zip(urls["uid"], urls["url"])))
    reasons = index.loc[index["status"] != "success", "error_message"].map(_failure_reason).value_counts()
    n_ok = int((index["status"] == "success").sum())
    log.info(f"[{NAME}] ok {n_ok}, failed {len(index) - n_ok} of {len(index)}"
             + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())})" if len(reasons) else ""))
    return {"urls": len(urls), "ok": n_ok, "failed": int(len(index) - n_ok), "shards": n_shards,
            "failures_by_reason": {str(k): int(v) for k, v in reasons.items()}}
