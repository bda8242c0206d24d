"""Filtering manifests (by epoch, class, confidence, selected) to CSV, parquet or the terminal.

Filters run on Arrow record batches, so the output streams too: a query over a large pool holds
one batch at a time (plus the first ``limit`` rows when printing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from kd3.errors import Kd3Error
from kd3.inspect.manifests import ManifestRef, columns_of, iter_batches, prediction_columns
from kd3.runs import atomic_path

OUTPUT_FORMATS = (".csv", ".parquet")


@dataclass(frozen=True)
class RowFilter:
    """Which rows of a manifest to keep; None means "any"."""

    selected: Optional[bool] = None
    #: class indices of the label column (see ``by``)
    classes: Optional[tuple[int, ...]] = None
    min_conf: Optional[float] = None
    #: prediction family for --class/--min-conf: combined, teacher or student (default: combined if present)
    by: Optional[str] = None


def resolve_classes(values: Sequence[str], names: Optional[Sequence[str]]) -> tuple[int, ...]:
    """``--class`` values (names or indices, repeated or comma-separated) → class indices.

    A name wins over an index where both could apply (class names are often "0".."9").
    """
    out: list[int] = []
    for raw in (v.strip() for value in values for v in value.split(",")):
        if not raw:
            continue
        if names is not None and raw in names:
            out.append(list(names).index(raw))
            continue
        try:
            k = int(raw)
        except ValueError:
            known = f"; classes: {', '.join(names[:20])}{' …' if len(names) > 20 else ''}" if names else ""
            raise Kd3Error(f"--class {raw!r}: not a class name or index{known}") from None
        if k < 0 or (names is not None and k >= len(names)):
            raise Kd3Error(f"--class {raw}: index outside 0..{len(names) - 1 if names else '?'}")
        out.append(k)
    return tuple(dict.fromkeys(out))


def _mask(batch: pa.RecordBatch, flt: RowFilter, label_col: str, conf_col: str) -> Optional[pa.Array]:
    """Boolean mask of the rows to keep; None keeps every row."""
    parts = []
    if flt.selected is not None:
        parts.append(pc.equal(pc.fill_null(batch.column("selected"), False), flt.selected))
    if flt.classes is not None:
        labels = batch.column(label_col)
        parts.append(pc.fill_null(pc.is_in(labels, value_set=pa.array(flt.classes).cast(labels.type)), False))
    if flt.min_conf is not None:
        parts.append(pc.fill_null(pc.greater_equal(batch.column(conf_col), flt.min_conf), False))
    mask = parts[0] if parts else None
    for part in parts[1:]:
        mask = pc.and_(mask, part)
    return mask


def filtered_batches(ref: ManifestRef, flt: RowFilter, columns: Optional[Sequence[str]] = None
                     ) -> Iterator[pa.RecordBatch]:
    """The manifest's rows that pass ``flt``, restricted to ``columns`` (default: all), batch by batch."""
    label_col, conf_col = prediction_columns(ref.path, flt.by)
    present = columns_of(ref.path)
    wanted = list(columns) if columns else present
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise Kd3Error(f"--columns: {ref.path} has no column(s) {', '.join(unknown)} "
                       f"(it has: {', '.join(present)})")
    needed = list(dict.fromkeys([*wanted, "selected", label_col, conf_col]))
    for batch in iter_batches(ref.path, needed):
        mask = _mask(batch, flt, label_col, conf_col)
        kept = batch if mask is None else batch.filter(mask)
        if kept.num_rows:
            yield kept.select(wanted)


def schema_of(ref: ManifestRef, columns: Optional[Sequence[str]] = None) -> pa.Schema:
    schema = pq.read_schema(ref.path)
    return pa.schema([schema.field(c) for c in (columns or schema.names)])


def conform(batches: Iterable[pa.RecordBatch], schema: pa.Schema, where: str) -> Iterator[pa.RecordBatch]:
    """Cast batches of several manifests (e.g. int16 vs int64 labels) to one schema."""
    for batch in batches:
        if batch.schema.equals(schema):
            yield batch
            continue
        try:
            yield pa.Table.from_batches([batch]).select(schema.names).cast(schema).to_batches()[0]
        except (pa.ArrowInvalid, KeyError, pa.ArrowNotImplementedError) as exc:
            raise Kd3Error(f"{where}: its columns do not match the first manifest's ({exc}); "
                           "query one --epoch at a time") from None


def write_rows(batches: Iterable[pa.RecordBatch], schema: pa.Schema, output: Path) -> int:
    """Write batches to ``output`` (.csv or .parquet) atomically; returns the number of rows."""
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise Kd3Error(f"--output {output}: unsupported format {suffix or '(none)'!r}; use .csv or .parquet")
    rows = 0
    with atomic_path(output) as tmp:
        writer = pcsv.CSVWriter(tmp, schema) if suffix == ".csv" else pq.ParquetWriter(tmp, schema)
        try:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
        finally:
            writer.close()
    return rows


def url_list_columns(run_dir: Optional[Path], columns: Sequence[str]) -> pa.Table:
    """uid plus ``columns`` of the download's URL list (``RUN/download/url_list.parquet``: the crawl
    list's caption and extra columns, kept there once rather than copied into every manifest)."""
    from kd3.inspect.truth import url_list_path

    if run_dir is None:
        raise Kd3Error("--url-columns: cannot tell which run this manifest belongs to; pass --run-dir")
    path = url_list_path(run_dir)
    if not path.is_file():
        raise Kd3Error(f"--url-columns: {path} not found (run `kd3 download` for this run first)")
    present = pq.read_schema(path).names
    unknown = [c for c in columns if c not in present or c == "uid"]
    if unknown:
        raise Kd3Error(f"--url-columns: {path} has no column(s) {', '.join(unknown)} (it has: {', '.join(present)})")
    return pq.read_table(path, columns=["uid", *columns])


def join_url_columns(batches: Iterable[pa.RecordBatch], lookup: pa.Table) -> Iterator[pa.RecordBatch]:
    """Each batch with the lookup's columns appended, matched on uid (null where a uid is not listed)."""
    uids = lookup.column("uid").combine_chunks()
    extra = [(name, lookup.column(name).combine_chunks()) for name in lookup.column_names if name != "uid"]
    for batch in batches:
        if "uid" not in batch.schema.names:
            raise Kd3Error("--url-columns joins on uid: keep uid in --columns")
        where = pc.index_in(batch.column("uid").cast(uids.type), value_set=uids)
        arrays = list(batch.columns) + [values.take(where) for _, values in extra]
        yield pa.RecordBatch.from_arrays(arrays, names=[*batch.schema.names, *(name for name, _ in extra)])
