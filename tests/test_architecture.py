"""The package's shape, checked from the source: dependencies point one way, no import cycles,
no module reaching into another's private names, no function longer than a page (80 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ibnorm"

# math ← layers ← recognize/surgery ← calibration ← pipeline ← commands.  A module may import
# modules of its own rank or below.  Modules not listed are top level (they may import anything).
RANKS = {
    "ibnorm.errors": 0, "ibnorm.version": 0, "ibnorm.spec": 0, "ibnorm.compression": 0, "ibnorm.functional": 0, "ibnorm.kernels": 0,
    "ibnorm.io": 0, "ibnorm.data": 0, "ibnorm.plot": 0, "ibnorm.validate": 0,
    "ibnorm.layers": 1,
    "ibnorm.recognize": 2, "ibnorm.surgery": 2,
    "ibnorm.calibration": 3,
    "ibnorm.hf": 4, "ibnorm.pipeline": 4, "ibnorm.loading": 4, "ibnorm.evaluate": 4, "ibnorm.inspect": 4,
}
TOP = 9


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _rank(module: str) -> int:
    best = None
    for prefix, rank in RANKS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return best[1] if best else TOP


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) for every import inside the package."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "ibnorm" or target.startswith("ibnorm."):
                names = [a.name for a in node.names]
                # ``from . import x`` imports the submodule x
                if node.module is None:
                    out.extend((f"{target}.{n}", [], node.lineno) for n in names)
                else:
                    out.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names if a.name.startswith("ibnorm"))
    return out


FILES = [p for p in sorted(PACKAGE.rglob("*.py")) if "remote_code" not in p.parts]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_dependencies_point_one_way(path):
    me = _module_name(path)
    if me == "ibnorm":
        return  # the lazy export table names everything
    for target, names, line in _imports(path):
        assert _rank(target) <= _rank(me), f"{me} (rank {_rank(me)}) imports {target} (rank {_rank(target)}) at line {line}"
        if target != me and not target.startswith(me + "."):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{me} imports private {private} from {target} at line {line}"


def test_io_knows_nothing_of_ibnorm_layers():
    for path in (PACKAGE / "io").rglob("*.py"):
        for target, _, line in _imports(path):
            assert _rank(target) == 0, f"{_module_name(path)} imports {target} at line {line}"


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in FILES}
    for path in FILES:
        me = _module_name(path)
        if me == "ibnorm":
            continue
        deps = set()
        for target, names, _ in _imports(path):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in modules and cand != me and cand != "ibnorm":
                    deps.add(cand)
                    break
        graph[me] = deps
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_longer_than_a_page(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 80, f"{path.name}:{node.lineno} {node.name} is {length} lines"
