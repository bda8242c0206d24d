"""The run folder's layout: every stage folder and artifact file name, in one place.

A stage writes only under its own folder and reads other stages' outputs through these names
(and the readers in :mod:`kd3.data`), never through literals of its own.

```
RUN/download/  url_list.parquet, refused.parquet, shards/ (NNNNN.tar, NNNNN.parquet, NNNNN_stats.json), meta.json
RUN/score/     teacher_outputs.parquet, pixels.npy + pixel_channels.npy (decoded-pixel cache),
               teacher_feature_maps.npy, meta.json
RUN/dedup/     removed.parquet, keep.parquet, meta.json
RUN/select/    manifest.parquet, meta.json
RUN/train*/    epoch_XXX.pt, last.pt, metrics.jsonl, selection/epoch_XXX.parquet, validation.parquet
RUN/average*/  <mode>.pt
RUN/evaluate/  report.json, report.md, reliability_<dataset>.png
RUN/inspect/   index.html, summary.*, plots/, sheets/
RUN/prepare-teacher/  teacher.pt (generic teacher), metrics.jsonl, students/<pool member>.pt
```
Every stage folder also holds ``meta.json`` and ``stage.log``; beside each is ``RUN/.<stage>.lock``,
the lock a running stage holds (:func:`kd3.runs.stage_lock`).
"""

from __future__ import annotations

from pathlib import Path

# stage folders (train and average take a suffix for variant runs: train-kd/, average-kd/)
DEMO_DATA = "demo-data"
DOWNLOAD = "download"
SCORE = "score"
DEDUP = "dedup"
SELECT = "select"
TRAIN = "train"
AVERAGE = "average"
EVALUATE = "evaluate"
INSPECT = "inspect"
#: optional, the teacher owner's side: RUN/prepare-teacher/ teacher.pt, metrics.jsonl, students/<name>.pt
PREPARE_TEACHER = "prepare-teacher"

# artifacts
URL_LIST = "url_list.parquet"
#: URL-list rows the download refused before any request (uid, url as given, reason)
REFUSED_URLS = "refused.parquet"
SCORE_CACHE = "teacher_outputs.parquet"
#: the score stage's decoded-pixel cache (kd3.data.pixel_cache)
PIXEL_CACHE = "pixels.npy"
PIXEL_CHANNELS = "pixel_channels.npy"
#: the teacher's feature maps per pool row (KD³'s feature alignment reads them instead of running the teacher)
FEATURE_MAP_CACHE = "teacher_feature_maps.npy"
SELECT_MANIFEST = "manifest.parquet"
#: the dedup stage's removed samples (uid, reason, nearest match, similarity) and the kept uids
DEDUP_REMOVED = "removed.parquet"
DEDUP_KEEP = "keep.parquet"
SELECTION_DIR = "selection"
VALIDATION = "validation.parquet"
METRICS = "metrics.jsonl"
LAST_CHECKPOINT = "last.pt"
#: train's mid-epoch resume point (on a stop signal or every train.checkpoint_every_steps), removed
#: once the epoch it is in has finished
MID_EPOCH_CHECKPOINT = "resume.pt"
#: prepare-teacher's outputs: the generic teacher checkpoint and the folder of extracted pool students
GENERIC_TEACHER = "teacher.pt"
POOL_STUDENTS = "students"
#: every stage folder: the stage's log, appended to on --resume (kd3.logs)
STAGE_LOG = "stage.log"


def epoch_checkpoint(epoch: int) -> str:
    """``epoch_XXX.pt`` for a 0-based epoch."""
    return f"epoch_{epoch:03d}.pt"


def epoch_manifest(epoch: int) -> str:
    """``epoch_XXX.parquet`` (inside ``selection/``) for a 0-based epoch."""
    return f"epoch_{epoch:03d}.parquet"


def score_cache(run_dir: Path) -> Path:
    return Path(run_dir) / SCORE / SCORE_CACHE


def dedup_removed(run_dir: Path) -> Path:
    return Path(run_dir) / DEDUP / DEDUP_REMOVED


def select_manifest(run_dir: Path) -> Path:
    return Path(run_dir) / SELECT / SELECT_MANIFEST


def selection_dir(train_dir: Path) -> Path:
    return Path(train_dir) / SELECTION_DIR
