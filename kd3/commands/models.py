"""`kd3 models [PATTERN]`: list the model architectures.

Without a pattern: the local entries and one line per library family (``torchvision/``, ``timm/``,
``open_clip/``; their names are not enumerated: timm alone has over a thousand). With a pattern:
every local or library name containing it, e.g. ``kd3 models resnet``, ``kd3 models timm/vit_tiny``,
``kd3 models open_clip/``. A pattern with ``*`` or ``?`` is a shell-style glob over the full name.
"""

from __future__ import annotations

import argparse
import fnmatch

NAME = "models"
SUMMARY = "list the model architectures (local entries + torchvision/, timm/, open_clip/ families)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="",
                        help="show only names containing this text (or matching a glob), "
                             "e.g. resnet, torchvision/, timm/vit_*")


def _matches(name: str, pattern: str) -> bool:
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def main(args: argparse.Namespace) -> int:
    from kd3.models import MODELS

    pattern: str = args.pattern
    for name in MODELS.names():
        if _matches(name, pattern):
            print(f"{name:32s} {MODELS.describe(name)}")
    if not pattern:
        print()
        for prefix, family in MODELS.families.items():
            print(f"{prefix + '/<name>':32s} {family.summary}")
        print(f"{'package.module:factory':32s} your own nn.Module (or path/to/net.py:factory); see docs/models.md")
        print("\n`kd3 models PATTERN` searches the library names too, e.g. `kd3 models torchvision/` or "
              "`kd3 models timm/resnet`.")
        return 0
    for prefix, family in MODELS.families.items():
        # a pattern naming another family (e.g. "timm/…") must not import this one's library
        if "/" in pattern and not pattern.startswith(prefix + "/") and not pattern.startswith(("*", "?")):
            continue
        sub = pattern[len(prefix) + 1:] if pattern.startswith(prefix + "/") else pattern
        glob = any(ch in pattern for ch in "*?[")
        names = family.list_names("" if glob else sub)
        for name in names:
            full = f"{prefix}/{name}"
            if _matches(full, pattern):
                print(full)
    return 0
