"""What a stage process loads before it works: each `make` target is a fresh process, so an import
that is not needed is paid once per stage (torchvision ~2.5 s, torch._dynamo ~2 s on this CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import json, sys
import torch
import kd3.stages, kd3.cli
from kd3.config import RunSection
from kd3.runtime import configure
configure(RunSection(deterministic=True))
print(json.dumps({"torchvision": "torchvision" in sys.modules, "dynamo": "torch._dynamo" in sys.modules,
                  "deterministic": torch.are_deterministic_algorithms_enabled(),
                  "warn_only": torch.is_deterministic_algorithms_warn_only_enabled()}))
"""


def test_stage_start_loads_neither_torchvision_nor_the_compiler_and_is_deterministic():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "torchvision": False, "dynamo": False, "deterministic": True, "warn_only": True}
