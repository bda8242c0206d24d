"""Every package kd3 imports is declared in pyproject.toml; the demo's own packages are an extra that
importing kd3 and running the other stages never needs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
#: the modules only `kd3 demo-data` imports (kd3/data/demo.py), and their distributions
DEMO_MODULES = {"sklearn": "scikit-learn", "skimage": "scikit-image", "mlxtend": "mlxtend"}
#: img2dataset's distributors beyond multiprocessing: module → its extra (kd3/data/distributors.py only)
DISTRIBUTOR_MODULES = {"pyspark": "spark", "ray": "ray"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports() -> dict[str, set[str]]:
    """top-level module → the kd3 files importing it (standard library and kd3 itself left out)."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "kd3").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "kd3" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return found


def test_every_imported_package_is_declared():
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    demo = {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["demo"]}
    distributions = metadata.packages_distributions()
    missing = []
    for module, files in sorted(_third_party_imports().items()):
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if module in DEMO_MODULES:
            assert dists & demo, f"{module} belongs in the demo extra"
            assert files == {"kd3/data/demo.py"}, f"{module} is imported outside the demo data: {files}"
        elif module in DISTRIBUTOR_MODULES:
            extra = PYPROJECT["project"]["optional-dependencies"][DISTRIBUTOR_MODULES[module]]
            assert module in {_name(r) for r in extra}, f"{module} belongs in the {DISTRIBUTOR_MODULES[module]} extra"
            assert files == {"kd3/data/distributors.py"}, f"{module} is imported outside the distributors: {files}"
            assert module not in declared, f"{module} must not be a hard dependency"
        elif not dists & declared:
            missing.append(f"{module} ({', '.join(sorted(files))})")
    assert not missing, f"imported but not declared in pyproject.toml dependencies: {missing}"
    assert not demo & declared, "the demo packages must not be hard dependencies"
    assert "kd3[demo]" in PYPROJECT["project"]["optional-dependencies"]["dev"]  # make demo / make test install it


def test_kd3_and_its_other_stages_import_without_the_demo_packages():
    # an import of any of them fails; the distributors' packages are optional too
    blocked = ", ".join(f"{m!r}: None" for m in [*DEMO_MODULES, *DISTRIBUTOR_MODULES])
    code = (f"import sys; sys.modules.update({{{blocked}}}); "
            "import kd3.cli, kd3.stages, kd3.commands; kd3.commands.discover(); "
            "from kd3.cli import build_parser; build_parser(); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
