"""uid lists of samples that select and train must leave out (``select.exclude`` / ``train.exclude``).

A list is a .parquet file with a ``uid`` column — such as ``RUN/dedup/removed.parquet`` written by
``kd3 dedup`` — or a .txt file with one uid a line (blank lines and ``#`` comments skipped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from kd3.config import PipelineConfig, require_file, resolve_path
from kd3.errors import Kd3Error
from kd3.runs import file_fingerprint


def read_uids(path: Path) -> set[str]:
    """The uids listed in ``path`` (.parquet with a uid column, or text with one uid a line)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        try:
            if "uid" not in pq.read_schema(path).names:
                raise Kd3Error(f"{path}: an exclusion list needs a 'uid' column")
            return set(pd.read_parquet(path, columns=["uid"])["uid"].astype(str))
        except (OSError, ValueError) as exc:
            raise Kd3Error(f"{path}: not a readable parquet file ({exc})") from None
    lines = (line.strip() for line in path.read_text(errors="replace").splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def exclude_path(cfg: PipelineConfig, key: str, run_dir: Path) -> Optional[Path]:
    """The file the config key (``train.exclude`` / ``select.exclude``) names, checked to exist."""
    value = getattr(getattr(cfg, key.split(".")[0]), "exclude")
    if value is None:
        return None
    return require_file(cfg, key, resolve_path(value, run_dir),
                        "run `kd3 dedup` first, or point it at a uid list (.parquet with a uid column, or .txt)")


def exclude_inputs(cfg: PipelineConfig, key: str, run_dir: Path) -> dict[str, str]:
    """The input fingerprint of the exclusion list (empty without one), for resume checks."""
    path = exclude_path(cfg, key, run_dir)
    return {"exclude": file_fingerprint(path)} if path is not None else {}


def excluded_mask(cfg: PipelineConfig, key: str, run_dir: Path, uids: Sequence[str]) -> np.ndarray:
    """bool [N]: which of ``uids`` (score-cache order) the configured list excludes (all False without one)."""
    path = exclude_path(cfg, key, run_dir)
    if path is None:
        return np.zeros(len(uids), dtype=bool)
    listed = read_uids(path)
    return np.fromiter((uid in listed for uid in uids), dtype=bool, count=len(uids))
