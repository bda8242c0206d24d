"""``kd3 <stage> --config FILE [--run-dir DIR] [key=value …] [--overwrite | --resume] [-q | -v]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kd3 import __version__, logs, progress
from kd3.errors import Kd3Error

log = logging.getLogger("kd3.cli")  # not __name__: that is "__main__" under `python -m kd3.cli`

#: what the message for a missing --config suggests (there is no default: a default resolved against the
#: working directory breaks outside the repository, and one inside the package would still read paths
#: such as download.url_list from the working directory)
EXAMPLE_CONFIG = "pipelines/demo.yaml"

EPILOG = """\
Overrides are dotted config keys, e.g. `train.epochs=3 run.device=cpu`; values are YAML.
A stage refuses a non-empty output folder unless --resume (continue an unfinished stage, or reuse a
finished one with the same config and inputs) or --overwrite (start it over) is given.
A running stage locks its folder: a second kd3 on it is refused, naming the holder's PID and host.
"""


def _output_flags() -> argparse.ArgumentParser:
    """--quiet / --verbose / --progress-every, shared by every command."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only (the stage log "
                       "file still gets everything)")
    group.add_argument("-v", "--verbose", action="store_true", help="also print debug messages")
    flags.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                       help="seconds between progress lines of long loops (default %(default)s; 0: none); "
                       "a terminal also gets tqdm bars")
    return flags


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"pipeline YAML (required), e.g. {EXAMPLE_CONFIG}; a stage needs only the sections it reads")
    parser.add_argument("--run-dir", default=None,
                        help="run folder (default runs/<config file name without .yaml>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    from kd3.stages import STAGES

    parser = argparse.ArgumentParser(prog="kd3", description="kd3: data-free knowledge distillation from web images (KD³).",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kd3 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    flags = _output_flags()
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.SUMMARY, description=(stage.__doc__ or stage.SUMMARY).strip(),
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[flags])
        _add_common(p)
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--overwrite", action="store_true", help="delete this stage's output folder and redo it")
        mode.add_argument("--resume", action="store_true", help="continue an unfinished stage or reuse a finished one")
        p.add_argument("--dry-run", action="store_true", help="run the stage's input checks only (config, device, "
                       "files, checkpoints, upstream outputs) and write nothing; exit 0, or 2 with the error")
    p = sub.add_parser("validate", help="validate a pipeline config without running anything; says which stages it "
                       "has the sections for", parents=[flags])
    _add_common(p)
    from kd3.commands import discover

    for name, command in discover().items():
        p = sub.add_parser(name, help=command.SUMMARY, description=(command.__doc__ or command.SUMMARY).strip(),
                           parents=[flags])
        command.add_arguments(p)
    return parser


def default_run_dir(config_path: str) -> Path:
    return Path("runs") / Path(config_path).stem


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # overrides may follow flags (`train --resume train.epochs=3`), which argparse's nargs="*" misses
    args, extras = parser.parse_known_args(argv)
    unknown_flags = [x for x in extras if x.startswith("-") or "=" not in x]
    if unknown_flags or (extras and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown_flags or extras)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    from kd3 import dist
    from kd3.training.preemption import EXIT_CODE, Preempted

    try:
        other_rank = dist.world_from_env().rank != 0  # under torchrun: rank 0's console speaks for all
    except Kd3Error as exc:
        print(f"kd3: error: {exc}", file=sys.stderr)
        return 2
    logs.setup("quiet" if args.quiet or (other_rank and not args.verbose) else "verbose" if args.verbose else "normal")
    progress.settings.every = max(args.progress_every, 0.0)
    try:
        return _dispatch(args, argv)
    except Kd3Error as exc:  # the one-line error on stderr, whatever --quiet says (a stage's log file has more)
        print(f"kd3: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        print(f"kd3: preempted: {exc}", file=sys.stderr)
        return EXIT_CODE
    except KeyboardInterrupt:
        print("kd3: interrupted; rerun the stage with --resume to continue", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    from kd3.config import load_config
    from kd3.errors import ConfigError
    from kd3.stages import STAGES
    from kd3.stages.base import execute, missing_sections

    from kd3.commands import discover

    commands = discover()
    if args.command in commands:
        return int(commands[args.command].main(args) or 0)
    if args.config is None:
        raise ConfigError(f"kd3 {args.command} needs --config: the pipeline YAML, e.g. --config {EXAMPLE_CONFIG} "
                          "(the embedded demo, in the kd3 repository)")
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    if args.command == "validate":
        runnable = [name for name, stage in STAGES.items() if not missing_sections(cfg, stage)]
        log.info(f"{args.config}: valid; has the sections for {', '.join(runnable) or 'no stage'}")
        for name, stage in STAGES.items():
            if name not in runnable:
                log.info(f"  kd3 {name} would need: {', '.join(missing_sections(cfg, stage))}")
        return 0
    mode = "overwrite" if args.overwrite else "resume" if args.resume else None
    execute(STAGES[args.command], cfg, run_dir, mode, argv=["kd3", *argv], dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
