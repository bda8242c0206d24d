"""Package structure: no import circles (imports inside functions count too) and no stage that
imports another stage (their shared base aside). Read from the source with ``ast``, nothing runs."""

from __future__ import annotations

import ast
from pathlib import Path

import kd3

PACKAGE = Path(kd3.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module → the kd3 modules it imports anywhere in its body (``from kd3.x import y`` → kd3.x, or
    kd3.x.y when that is a module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("kd3"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if not base.startswith("kd3"):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        # a package's own __init__ importing its children is not a dependency of the children
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges into a package ``__init__`` that only re-exports its children are followed to the child
    modules it imports, so ``kd3.models`` → ``kd3.models.registry`` does not count as a circle with
    ``kd3.models.registry`` → ``kd3.models.base``."""
    return {m: {t for t in deps if not (t in graph and m.startswith(t + "."))} for m, deps in graph.items()}


def test_the_import_graph_has_no_circles():
    cycles = _cycles(_without_package_inits(import_graph()))
    assert cycles == [], f"import circles: {cycles}"


def test_no_stage_imports_another_stage():
    graph = import_graph()
    offenders = {m: sorted(t for t in deps if t.startswith("kd3.stages.") and t != "kd3.stages.base")
                 for m, deps in graph.items() if m.startswith("kd3.stages.") and m != "kd3.stages"}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_graph_reader_sees_function_level_imports():
    # the circle the training-engine issue found was hidden by an import inside a function
    graph = import_graph()
    assert "kd3.models.checkpoints" in graph["kd3.models.distilled"]
