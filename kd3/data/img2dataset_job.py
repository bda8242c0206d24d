"""The img2dataset call of the download stage, in a module light enough for the child process it
runs in (:func:`kd3.children.run_in_group` spawns a fresh interpreter, which imports the target's
module): stdlib only here, so the child imports img2dataset and nothing of the stage (kd3.stages
pulls in torch, pandas and pydantic: ~3 s of CPU per download before the first request).
``distributor: pyspark / ray`` also imports :mod:`kd3.data.distributors` (stdlib, kd3.errors and kd3.data.loopback only)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any


def run_img2dataset(options: dict[str, Any], log_path: str) -> None:
    """``img2dataset.download(**options)``, its prints (and its tqdm bar, when stderr is not a
    terminal, where it would be a run of carriage returns) into ``log_path``, also when it fails."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise calls home
    from img2dataset import download

    printed = io.StringIO()
    bar = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(printed)
    distributor = options.get("distributor", "multiprocessing")
    if distributor == "multiprocessing":
        cluster = contextlib.nullcontext()
    else:  # a local cluster started here, so its workers inherit the crawl guard's proxy variables
        from kd3.data.distributors import local_cluster

        cluster = local_cluster(distributor, options["processes_count"])
    try:
        with contextlib.redirect_stdout(printed), bar, cluster:
            download(**options)
    finally:
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(printed.getvalue())
