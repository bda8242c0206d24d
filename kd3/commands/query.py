"""`kd3 query`: filter a selection manifest by epoch, class, confidence and selected; print or save it.

Examples:
  kd3 query --run-dir runs/demo --epoch 9 --class 3 --selected          # print the first rows
  kd3 query --run-dir runs/demo --epoch all --class 3 --min-conf 0.9 --output class3.csv
  kd3 query --manifest runs/demo/select/manifest.parquet --rejected --output rejected.parquet
  kd3 query --run-dir runs/demo --summary                               # the summary tables
  kd3 query --run-dir runs/laion --selected --url-columns TEXT,LICENSE  # with the crawl list's columns
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "query"
SUMMARY = "filter a selection manifest (epoch, class, confidence, selected) to CSV/parquet, or summarise it"
#: columns printed to the terminal when --columns is not given (files get every column)
TERMINAL_COLUMNS = ("uid", "epoch", "selected", "{label}", "{conf}", "url")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kd3.inspect.args import add_filter_arguments, add_source_arguments

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    add_source_arguments(parser, "a training epoch number, 'last' (default), 'select' (the select stage's "
                                 "manifest) or 'all' (every training epoch)")
    add_filter_arguments(parser, default_selected=None)
    parser.add_argument("--columns", default=None, help="comma-separated columns to output (default: all in files)")
    parser.add_argument("--url-columns", default=None,
                        help="comma-separated columns of the download's URL list (e.g. TEXT,LICENSE: a crawl "
                             "list's caption and extra columns) to add to each row, joined on uid")
    parser.add_argument("--output", default=None, help="write the rows to this .csv or .parquet file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--limit", type=int, default=20, help="rows printed without --output (default 20)")
    parser.add_argument("--summary", action="store_true",
                        help="print the summary tables (per-class counts, τ_k, α, churn, histogram) instead of rows; "
                             "without --epoch: every manifest of the run")
    parser.add_argument("--bins", type=int, default=20, help="confidence histogram bins for --summary")


def _summary(args: argparse.Namespace) -> int:
    from kd3.errors import Kd3Error
    from kd3.inspect.args import resolve_source
    from kd3.inspect.manifests import find_manifests
    from kd3.inspect.summary import format_summary, summarize

    if args.classes or args.min_conf is not None or args.selected is not None or args.columns or args.output:
        raise Kd3Error("--summary describes whole manifests; drop --class/--min-conf/--selected/--rejected/"
                       "--columns/--output")
    if args.bins < 2:
        raise Kd3Error(f"--bins {args.bins}: need at least 2")
    refs, run_dir, names = resolve_source(args)
    if run_dir is not None and not args.manifest and args.epoch is None:
        refs = find_manifests(run_dir, args.train)
    print(format_summary(summarize(refs, names, args.bins, run_dir, args.by, args.train)))
    return 0


def main(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from kd3.errors import Kd3Error
    from kd3.inspect.args import resolve_source, row_filter
    from kd3.inspect.manifests import prediction_columns
    from kd3.inspect.query import conform, filtered_batches, join_url_columns, schema_of, url_list_columns, write_rows

    if args.summary:
        if args.url_columns:
            raise Kd3Error("--summary describes whole manifests; drop --url-columns")
        return _summary(args)
    refs, run_dir, names = resolve_source(args)
    flt = row_filter(args, names)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    if columns is None and not args.output:  # a readable subset on the terminal; files get everything
        label_col, conf_col = prediction_columns(refs[0].path, flt.by)
        present = set(schema_of(refs[0]).names)
        columns = [c for c in (t.format(label=label_col, conf=conf_col) for t in TERMINAL_COLUMNS) if c in present]
    schema = schema_of(refs[0], columns)
    url_columns = [c.strip() for c in args.url_columns.split(",") if c.strip()] if args.url_columns else []
    lookup = url_list_columns(run_dir, url_columns) if url_columns else None

    def batches():
        for ref in refs:
            rows = conform(filtered_batches(ref, flt, columns), schema, str(ref.path))
            yield from (join_url_columns(rows, lookup) if lookup is not None else rows)

    output_schema = schema if lookup is None else pa.schema([*schema, *(lookup.schema.field(c) for c in url_columns)])

    if args.output:
        output = Path(args.output)
        if output.exists() and not args.overwrite:
            raise Kd3Error(f"--output {output} exists; pass --overwrite to replace it")
        rows = write_rows(batches(), output_schema, output)
        log.info(f"[{NAME}] {rows} row(s) from {len(refs)} manifest(s) -> {output}")
        return 0
    if args.limit < 0:
        raise Kd3Error(f"--limit {args.limit}: must be 0 or more")
    head: list[pa.RecordBatch] = []
    total = 0
    for batch in batches():  # count every match, keep only the first --limit rows
        if total < args.limit:
            head.append(batch.slice(0, args.limit - total))
        total += batch.num_rows
    if head:
        frame = pa.Table.from_batches(head).to_pandas()
        print(frame.to_string(index=False, max_colwidth=60))  # the rows are the output, not a log message
    shown = min(total, args.limit)
    log.info(f"[{NAME}] {total} row(s) match in {len(refs)} manifest(s)"
             + (f"; showing {shown} (use --limit or --output for more)" if shown < total else ""))
    return 0
