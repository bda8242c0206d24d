"""`kd3 export`: write chosen samples as new webdataset shards (original image bytes + json + cls).

Examples:
  kd3 export --run-dir runs/demo --output exports/final                 # last epoch's selection
  kd3 export --run-dir runs/demo --epoch 5 --class 3 --min-conf 0.95 --output exports/e5_c3
  kd3 export --manifest runs/demo/select/manifest.parquet --output exports/select --maxcount 1000

The output folder gets NNNNN.tar, sizes.json, manifest.parquet (the exported rows) and meta.json
(arguments, counts, expected vs written). A non-empty folder is refused unless --overwrite is given,
and --overwrite only replaces a folder written by `kd3 export`. Exits 1 when some samples were not
found in the shards (listed in missing_uids.txt).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "export"
SUMMARY = "write a filtered selection as new webdataset shards (a resharder for other tools)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kd3.inspect.args import add_filter_arguments, add_source_arguments

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    add_source_arguments(parser, "a training epoch number, 'last' (default) or 'select' (the select stage's manifest)")
    add_filter_arguments(parser, default_selected=True)
    parser.add_argument("--output", required=True, help="folder for the new shards")
    parser.add_argument("--shards", default=None,
                        help="source shards folder (default: RUN/download/shards of the manifest's run)")
    parser.add_argument("--maxcount", type=int, default=10_000, help="samples per output shard (default 10000)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous export in --output")
    parser.add_argument("--dry-run", action="store_true", help="count the matching samples, write nothing")


def main(args: argparse.Namespace) -> int:
    from kd3.errors import Kd3Error
    from kd3.inspect.args import resolve_source, row_filter
    from kd3.inspect.export import export_selection

    if args.epoch == "all":
        raise Kd3Error("--epoch all: export writes one selection; pick one epoch (or 'last'/'select')")
    refs, run_dir, names = resolve_source(args)
    if args.shards:
        shards = Path(args.shards)
    elif run_dir is not None:
        shards = run_dir / "download" / "shards"
    else:
        raise Kd3Error(f"--manifest {args.manifest}: not inside a run folder; pass --shards DIR (the download "
                       "stage's shards)")
    flt = row_filter(args, names)
    counts = export_selection(refs[0], flt, shards, Path(args.output), maxcount=args.maxcount,
                              overwrite=args.overwrite, dry_run=args.dry_run, class_names=names,
                              args={k: v for k, v in vars(args).items() if k != "func"})
    if args.dry_run:
        return 0
    log.info(f"[{NAME}] wrote {counts['written']} of {counts['expected']} sample(s) from {refs[0].name} into "
             f"{counts['shards']} shard(s) in {args.output}")
    if counts["missing"]:
        log.warning(f"[{NAME}] warning: {counts['missing']} sample(s) not found in {shards}; "
                    f"see {Path(args.output) / 'missing_uids.txt'}")
        return 1
    return 0
