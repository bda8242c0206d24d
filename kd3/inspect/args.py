"""Command-line arguments shared by ``kd3 query`` and ``kd3 export``: where the manifest is, which rows."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from kd3.errors import Kd3Error
from kd3.inspect.manifests import (FAMILIES, TRAIN_DIR, ManifestRef, class_names, pick_manifests, ref_for_path,
                                   run_dir_of)
from kd3.inspect.query import RowFilter, resolve_classes

DEFAULT_RUN_DIR = "runs/demo"


def add_source_arguments(parser: argparse.ArgumentParser, epoch_help: str) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run-dir", default=None,
                        help=f"run folder whose manifests to read (default {DEFAULT_RUN_DIR})")
    source.add_argument("--manifest", default=None, help="a manifest parquet file instead of a run's")
    parser.add_argument("--epoch", default=None, help=epoch_help)
    parser.add_argument("--train", default=TRAIN_DIR, metavar="FOLDER",
                        help=f"the train stage's folder in the run, i.e. train.output (default {TRAIN_DIR})")


def add_filter_arguments(parser: argparse.ArgumentParser, default_selected: Optional[bool]) -> None:
    parser.add_argument("--class", dest="classes", action="append", default=None, metavar="NAME_OR_INDEX",
                        help="keep these classes (repeat or comma-separate; names from score/meta.json)")
    parser.add_argument("--min-conf", type=float, default=None, help="keep rows whose confidence is at least this")
    parser.add_argument("--by", choices=FAMILIES, default=None,
                        help="prediction that --class/--min-conf use (default: combined if present, else teacher)")
    which = parser.add_mutually_exclusive_group()
    default = {True: "--selected", False: "--rejected", None: "--any"}[default_selected]
    which.add_argument("--selected", dest="selected", action="store_const", const=True,
                       help="only selected rows" + (" (default)" if default == "--selected" else ""))
    which.add_argument("--rejected", dest="selected", action="store_const", const=False, help="only rejected rows")
    which.add_argument("--any", dest="selected", action="store_const", const=None,
                       help="selected and rejected rows" + (" (default)" if default == "--any" else ""))
    parser.set_defaults(selected=default_selected)


def resolve_source(args: argparse.Namespace, default_epoch: Optional[str] = None
                   ) -> tuple[list[ManifestRef], Optional[Path], Optional[list[str]]]:
    """(manifests, run folder or None, class names or None) from --run-dir/--manifest/--epoch."""
    if args.manifest:
        if args.epoch is not None:
            raise Kd3Error("--epoch picks a manifest of --run-dir; drop it when passing --manifest")
        ref = ref_for_path(Path(args.manifest))
        run_dir = run_dir_of(ref.path)
        return [ref], run_dir, class_names(run_dir)
    run_dir = Path(args.run_dir or DEFAULT_RUN_DIR)
    if not run_dir.is_dir():
        raise Kd3Error(f"--run-dir {run_dir}: folder not found (pass --run-dir RUN or --manifest FILE)")
    epoch = args.epoch if args.epoch is not None else default_epoch
    return pick_manifests(run_dir, epoch, args.train), run_dir, class_names(run_dir)


def row_filter(args: argparse.Namespace, names: Optional[list[str]]) -> RowFilter:
    if args.min_conf is not None and not 0.0 <= args.min_conf <= 1.0:
        raise Kd3Error(f"--min-conf {args.min_conf}: must be between 0 and 1")
    classes = resolve_classes(args.classes, names) if args.classes else None
    return RowFilter(selected=args.selected, classes=classes, min_conf=args.min_conf, by=args.by)
