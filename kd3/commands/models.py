"""`kd3 models`: list the registered model architectures."""

from __future__ import annotations

import argparse

NAME = "models"
SUMMARY = "list the registered model architectures"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="", help="show only names containing this text")


def main(args: argparse.Namespace) -> int:
    from kd3.models import MODELS

    for name in MODELS.names():
        if args.pattern in name:
            print(f"{name:32s} {MODELS.describe(name)}")
    return 0
