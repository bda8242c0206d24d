"""The score stage's cache (teacher logits + pooled features per pool sample), read by every later stage.

``RUN/score/teacher_outputs.parquet``: uid, url, shard, key, teacher_label, teacher_conf, logits
[K], feature [D], in (shard, key) order; ``RUN/score/meta.json`` holds the teacher's metadata.
Later stages index it by row (``uid_to_row``), so row order is part of the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kd3 import layout
from kd3.data.pixel_cache import PoolPixels
from kd3.errors import Kd3Error
from kd3.models.spec import ModelMeta
from kd3.runs import check_outputs, require_complete


@dataclass
class TeacherOutputs:
    """The score cache in memory: row i of ``logits``/``features`` belongs to ``frame.uid[i]``."""

    frame: pd.DataFrame  # uid, url, shard, key, teacher_label, teacher_conf
    logits: torch.Tensor  # [N, K] float32
    features: torch.Tensor  # [N, D] float32
    teacher: ModelMeta
    #: BN in-domain score [N] (lower = more in-domain); None for a teacher without BatchNorm
    bn_score: Optional[torch.Tensor] = None
    #: the same per BatchNorm layer [N, L]
    bn_per_layer: Optional[torch.Tensor] = None
    #: the decoded pool images by row (None when the score stage wrote no pixel cache)
    pixels: Optional[PoolPixels] = None
    #: the teacher's feature maps [N, C, h, w] float32, memory-mapped (None when not cached)
    feature_maps: Optional[np.ndarray] = None

    def feature_map_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The cached teacher feature maps of score-cache ``rows`` [B] → [B, C, h, w]."""
        return torch.from_numpy(self.feature_maps[rows.numpy()])

    @property
    def uid_to_row(self) -> dict[str, int]:
        return {uid: i for i, uid in enumerate(self.frame["uid"])}


def fixed_list(values: np.ndarray) -> pa.Array:
    """[N, D] float array → an arrow fixed-size-list column (how logits and features are stored)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _stack_list_column(table: pa.Table, name: str) -> torch.Tensor:
    column = table.column(name).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    width = len(values) // max(len(column), 1)
    if width * len(column) != len(values):
        raise Kd3Error(f"score cache column {name!r} has rows of different lengths; rerun `kd3 score --overwrite`")
    return torch.from_numpy(values.astype("float32", copy=True).reshape(len(column), width))


#: the score stage's output files, fingerprinted in its meta.json ``outputs``
SCORE_FILES = (layout.SCORE_CACHE, layout.PIXEL_CACHE, layout.PIXEL_CHANNELS, layout.FEATURE_MAP_CACHE)
#: the caches later stages do without (they decode the images, run the teacher): deleting one is fine
OPTIONAL_SCORE_FILES = SCORE_FILES[1:]


def score_output_fingerprints(score_dir: Path) -> dict[str, str]:
    """Size of each score output (and the cache's row count, from its parquet footer); absent ones
    are left out. A truncated or unreadable cache is a Kd3Error."""
    found = {}
    for name in SCORE_FILES:
        path = Path(score_dir) / name
        if not path.is_file():
            continue
        found[name] = f"{path.stat().st_size} bytes"
        if name == layout.SCORE_CACHE:
            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise Kd3Error(f"{path}: unreadable score cache ({type(exc).__name__}: {exc}); "
                               "redo it with `kd3 score --overwrite`") from None
            found[name] += f", {rows} rows"
    return found


def require_score(run_dir: Path, needed_by: str) -> dict:
    """The meta of ``run_dir``'s finished score stage, after checking its cache is there, readable and
    the one score wrote (before any work of ``needed_by``)."""
    meta = require_complete(Path(run_dir), layout.SCORE, needed_by)
    cache = layout.score_cache(run_dir)
    if not cache.is_file():
        raise Kd3Error(f"{needed_by} needs the score cache {cache}, which is missing (the score stage says it "
                       "finished); redo it with `kd3 score --overwrite`")
    check_outputs(run_dir, layout.SCORE, score_output_fingerprints(Path(run_dir) / layout.SCORE), needed_by,
                  optional=OPTIONAL_SCORE_FILES)
    return meta


def load_teacher_outputs(run_dir: Path, needed_by: str = "this stage") -> TeacherOutputs:
    """The finished score stage's cache of ``run_dir`` (a clear error when it is missing or unfinished)."""
    meta = require_complete(Path(run_dir), layout.SCORE, needed_by)
    table = pq.read_table(layout.score_cache(run_dir))
    bn = "bn_score" in table.column_names
    frame = table.drop_columns([c for c in ("logits", "feature", "bn_score", "bn_per_layer")
                                if c in table.column_names]).to_pandas()
    return TeacherOutputs(frame=frame, logits=_stack_list_column(table, "logits"),
                          features=_stack_list_column(table, "feature"), teacher=ModelMeta.from_dict(meta["teacher"]),
                          bn_score=torch.from_numpy(table.column("bn_score").to_numpy().astype("float32")) if bn else None,
                          bn_per_layer=_stack_list_column(table, "bn_per_layer") if bn else None,
                          pixels=PoolPixels.open(run_dir, frame), feature_maps=_feature_maps(run_dir, len(frame)))


def _feature_maps(run_dir: Path, rows: int) -> Optional[np.ndarray]:
    path = Path(run_dir) / layout.SCORE / layout.FEATURE_MAP_CACHE
    if not path.is_file():
        return None
    maps = np.load(path, mmap_mode="r")
    return maps if maps.shape[0] == rows else None
