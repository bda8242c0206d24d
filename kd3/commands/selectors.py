"""`kd3 selectors`: list the registered selectors (with their parameters and defaults) and objectives.

A selector chooses the pool samples a student trains on (``train.selector``, every epoch) or the
stand-alone select stage writes (``select.selector``); its parameters are ``selectors.<name>.<key>``.
An objective is what a training step optimises (``train.objective``).
"""

from __future__ import annotations

import argparse

NAME = "selectors"
SUMMARY = "list the registered selectors (parameters, defaults) and training objectives"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    from kd3.methods.selectors import SELECTORS
    from kd3.training.objectives import EXTRA_LOSSES, OBJECTIVES

    # the listing is this command's output (stdout, also with --quiet), not log messages
    print("selectors (train.selector / select.selector; parameters selectors.<name>.<key>):")
    for name in SELECTORS:
        print(f"  {name:20s} {SELECTORS.describe(name)}")
        for key, field in SELECTORS.get(name).params.model_fields.items():
            print(f"  {'':20s}   {key} = {field.default!r}")
    print("objectives (train.objective):")
    for name in OBJECTIVES:
        section = OBJECTIVES.get(name).section
        print(f"  {name:20s} {OBJECTIVES.describe(name)}" + (f" (settings: the {section} section)" if section else ""))
    print("extra losses (train.extra_losses):")
    for name in EXTRA_LOSSES:
        print(f"  {name:20s} {EXTRA_LOSSES.describe(name)}")
    return 0
