"""Non-stage CLI commands (tools such as `kd3 models`), one module each, discovered automatically.

A command module defines ``NAME``, ``SUMMARY``, ``add_arguments(parser)`` and ``main(args) -> int``.
Stages (which own a run sub-folder) live in :mod:`kd3.stages` instead.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def discover() -> dict[str, ModuleType]:
    commands = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "main"):
            commands[module.NAME] = module
    return commands
