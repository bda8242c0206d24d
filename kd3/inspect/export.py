"""Resharding a filtered selection into new webdataset shards (DataComp's resharder, for one manifest).

Each exported sample keeps its original member bytes unchanged (image, and any caption), keyed by
uid, plus a new ``json`` (uid, url, label, class, confidence, the manifest row, and the download's
own metadata under ``download``) and ``cls`` (the label as text), so ``wds.WebDataset(...)
.decode().to_tuple("png", "cls")`` works on the result. The output folder gets ``NNNNN.tar``,
``sizes.json`` (samples per shard, as open_clip reads it), ``manifest.parquet`` (the exported rows
with their new shard) and ``meta.json`` (arguments, counts, expected vs written).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kd3 import __version__
from kd3.data.tars import is_plain_key
from kd3.errors import Kd3Error
from kd3.inspect.manifests import ManifestRef, prediction_columns, require_columns
from kd3.inspect.query import RowFilter, filtered_batches, schema_of
from kd3.inspect.tars import find_samples
from kd3.runs import atomic_path, atomic_write_json, atomic_write_text, file_fingerprint

log = logging.getLogger(__name__)

COMMAND = "export"
_STAGING = ".partial"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def prepare_output(output: Path, overwrite: bool, shards_dir: Path) -> None:
    """Refuse a non-empty folder unless --overwrite, and then only a previous export's folder."""
    output, shards_dir = Path(output).resolve(), Path(shards_dir).resolve()
    if output == shards_dir or shards_dir in output.parents:
        raise Kd3Error(f"--output {output}: inside the source shards folder {shards_dir}; choose another folder")
    if output.exists() and not output.is_dir():
        raise Kd3Error(f"--output {output}: exists and is not a folder")
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise Kd3Error(f"--output {output} is not empty; pass --overwrite to replace a previous export, "
                           "or choose another folder")
        meta_path = output / "meta.json"
        try:
            is_export = json.loads(meta_path.read_text()).get("command") == COMMAND
        except (OSError, json.JSONDecodeError, AttributeError):
            is_export = False
        if not is_export:  # --overwrite must never wipe a run folder or a home directory by mistake
            raise Kd3Error(f"--overwrite: {output} has no meta.json from `kd3 export`, so it is not replaced; "
                           "remove it yourself or choose another --output")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def _plain(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _sample_json(row: dict[str, Any], label_col: str, conf_col: str, names: Optional[Sequence[str]],
                 original: Optional[bytes]) -> bytes:
    label = row.get(label_col)
    record: dict[str, Any] = {
        "uid": row["uid"], "url": row.get("url"), "label": label,
        "class": names[label] if names is not None and label is not None and 0 <= label < len(names) else None,
        "conf": row.get(conf_col), "label_column": label_col,
        "source_shard": row.get("shard"), "source_key": row.get("key"),
    }
    record.update({k: v for k, v in row.items() if k not in record and k not in ("shard", "key")})
    if original is not None:
        try:
            record["download"] = json.loads(original)
        except json.JSONDecodeError:
            pass  # the image bytes are what matter; an odd json is simply not carried over
    return json.dumps(record, default=str).encode("utf-8")


def export_selection(ref: ManifestRef, flt: RowFilter, shards_dir: Path, output: Path, maxcount: int = 10_000,
                     overwrite: bool = False, dry_run: bool = False, class_names: Optional[Sequence[str]] = None,
                     args: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write the manifest rows passing ``flt`` as new shards in ``output``; returns the counts."""
    shards_dir, output = Path(shards_dir), Path(output)
    label_col, conf_col = prediction_columns(ref.path, flt.by)
    require_columns(ref.path, ["uid", "shard", "key"], "to find the samples in the shards (kd3 export)")
    if not shards_dir.is_dir():
        raise Kd3Error(f"--shards {shards_dir}: folder not found; pass the download stage's RUN/download/shards")
    if maxcount < 1:
        raise Kd3Error(f"--maxcount {maxcount}: must be at least 1")
    table = pa.Table.from_batches(list(filtered_batches(ref, flt)), schema=schema_of(ref))
    expected = table.num_rows
    if expected == 0:
        raise Kd3Error(f"{ref.path}: no sample passes the filter; nothing to export (loosen --class/--min-conf/"
                       "--selected)")
    if pc.count_distinct(table.column("uid")).as_py() != expected:
        raise Kd3Error(f"{ref.path}: the filtered rows repeat uids; export one manifest (one --epoch) at a time")
    # uids become tar member names here: only plain keys (no '/', '..', dots), checked before writing
    bad = next((u for u in table.column("uid").to_pylist() if not (isinstance(u, str) and is_plain_key(u))), None)
    if bad is not None:
        raise Kd3Error(f"{ref.path}: uid {bad!r} is not a plain sample key (letters, digits, '_', '-'); "
                       "it would become a tar member name: export refuses it (re-download with kd3's own uids)")
    if dry_run:
        log.info(f"[{COMMAND}] dry run: {expected} sample(s) of {ref.path} would go to {output}")
        return {"expected": expected, "written": 0, "dry_run": True}

    import webdataset as wds  # imports torch: only here, not for summaries and sheets

    prepare_output(output, overwrite, shards_dir)
    meta: dict[str, Any] = {
        "command": COMMAND, "status": "running", "kd3_version": __version__, "started_at": _now(),
        "argv": sys.argv, "args": args or {}, "manifest": str(ref.path),
        "manifest_fingerprint": file_fingerprint(ref.path),
        "epoch": ref.epoch, "filter": {"selected": flt.selected, "classes": list(flt.classes or []) or None,
                                       "min_conf": flt.min_conf, "label_column": label_col, "conf_column": conf_col},
        "shards_dir": str(shards_dir), "maxcount": maxcount,
    }
    atomic_write_json(output / "meta.json", meta)  # first, so a crashed export can be --overwritten
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    row_of = {uid: i for i, uid in enumerate(columns["uid"])}
    staging = output / _STAGING
    staging.mkdir()
    out_shard = np.full(expected, None, dtype=object)
    sizes: dict[str, int] = {}
    wanted = list(zip(columns["uid"], columns["shard"], columns["key"]))
    # write into a staging folder; shards appear in the output only once all are complete
    with wds.ShardWriter(str(staging / "%05d.tar"), maxcount=maxcount, verbose=0) as writer:
        for uid, _, _, files in find_samples(shards_dir, wanted):
            i = row_of[uid]
            if out_shard[i] is not None:
                continue  # found twice (e.g. duplicated in the shards): one copy is enough
            row = {name: _plain(values[i]) for name, values in columns.items()}
            sample = {"__key__": uid, **{ext: data for ext, data in files.items() if ext != "json"}}
            sample["json"] = _sample_json(row, label_col, conf_col, class_names, files.get("json"))
            sample["cls"] = str(row[label_col]).encode()
            writer.write(sample)
            name = Path(writer.fname).name
            out_shard[i] = name
            sizes[name] = sizes.get(name, 0) + 1
    for tar in sorted(staging.glob("*.tar")):
        if tar.name in sizes:
            os.replace(tar, output / tar.name)
        else:
            tar.unlink()  # ShardWriter opens a first shard even when nothing gets written
    staging.rmdir()
    exported = pa.array([s is not None for s in out_shard])
    table = table.append_column("exported", exported)
    table = table.append_column("export_shard", pa.array(list(out_shard), pa.string()))
    with atomic_path(output / "manifest.parquet") as tmp:
        pq.write_table(table, tmp)
    atomic_write_json(output / "sizes.json", sizes)
    written = int(sum(sizes.values()))
    missing = [str(u) for u, s in zip(columns["uid"], out_shard) if s is None]
    if missing:
        atomic_write_text(output / "missing_uids.txt", "".join(u + "\n" for u in missing))
    counts = {"expected": expected, "written": written, "missing": len(missing), "shards": len(sizes)}
    meta.update(status="complete" if not missing else "incomplete", counts=counts, reconciled=not missing,
                finished_at=_now())
    atomic_write_json(output / "meta.json", meta)
    return counts
