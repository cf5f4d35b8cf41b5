"""The code's shape, as a newcomer meets it: functions over 60 lines or 7 parameters, parameters typed ``Any``,
function-local imports of the project's own modules, upward import arrows (core -> sweep/serve/bench, sweep or
serve -> bench, sweep <-> serve, and between core's subpackages against tests/test_layers.py's CORE_ALLOWED) and
import cycles between modules and between core's subpackages (function-local and TYPE_CHECKING imports included).

    python -m bench.code_shape [ROOT] [-v]     # -v also lists every function-local import and Any parameter

Reads the files with ``ast`` (every folder, recursively); runs nothing. tests/test_layers.py asserts the arrows.
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

from tests.test_layers import CORE_ALLOWED, core_part

PACKAGES = ("core", "sweep", "serve", "bench", "tests")
LAYER = {"core": 0, "serve": 1, "sweep": 1, "bench": 2, "tests": 2}   # an arrow to a higher layer is upward
CHECKED = ("core", "sweep", "serve", "bench")                          # the packages whose functions are listed
MAX_LINES, MAX_PARAMS = 60, 7


def scan(root: Path) -> dict:
    """Long functions, many-parameter functions, function-local imports, upward arrows and the import graph."""
    found: dict = {"long": [], "many": [], "any": [], "local": set(), "arrows": set(),
                   "graph": collections.defaultdict(set), "parts": collections.defaultdict(set)}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            _scan_module(root, package, path, found)
    return found


def _scan_module(root: Path, package: str, path: Path, found: dict) -> None:
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local = {id(m) for f in functions for m in ast.walk(f) if isinstance(m, (ast.Import, ast.ImportFrom))}
    for f in functions if package in CHECKED else ():
        params = [p for p in f.args.posonlyargs + f.args.args + f.args.kwonlyargs if p.arg not in ("self", "cls")]
        params += [p for p in (f.args.vararg, f.args.kwarg) if p]
        where = f"{path.relative_to(root)}:{f.lineno} {f.name}"
        if f.end_lineno - f.lineno + 1 > MAX_LINES:
            found["long"].append((f.end_lineno - f.lineno + 1, where))
        if len(params) > MAX_PARAMS:
            found["many"].append((len(params), where))
        if package != "bench":
            found["any"] += [f"{where}({p.arg})" for p in params if _is_any(p.annotation)]
    for node in ast.walk(tree):
        for target in _project_targets(root, node):
            found["graph"][module].add(target)
            top = target.split(".")[0]
            if id(node) in local and package != "tests":
                found["local"].add((module, node.lineno))
            if LAYER[top] > LAYER[package] or {package, top} == {"sweep", "serve"}:
                found["arrows"].add(f"{module} -> {target}")
            _core_arrow(module, target, found)


def _core_arrow(module: str, target: str, found: dict) -> None:
    """Between core's parts: an arrow the layer table does not allow is upward; the part graph finds cycles."""
    source, part = core_part(module), core_part(target)
    if source is None or part is None or source == part:
        return
    found["parts"][source].add(part)
    if source in CORE_ALLOWED and part not in CORE_ALLOWED[source]:
        found["arrows"].add(f"{module} -> {target}")


def _is_any(annotation: ast.AST | None) -> bool:
    text = ast.unparse(annotation) if annotation is not None else ""
    return text.strip("'\"") in ("Any", "typing.Any")


def _project_targets(root: Path, node: ast.AST) -> set[str]:
    """The project modules an import statement names (``package.module``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        return set()
    return {t for t in map(lambda n: _module_of(root, n), names) if t}


def _module_of(root: Path, name: str) -> str | None:
    """The longest prefix of a dotted name that is a module file of the project (None: not the project's)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    for end in range(len(parts), 1, -1):
        if (root / Path(*parts[:end])).with_suffix(".py").is_file():
            return ".".join(parts[:end])
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(next((a for a in argv if not a.startswith("-")), "."))
    found = scan(root)
    print(f"functions over {MAX_LINES} lines: {len(found['long'])}")
    print("".join(f"   {n} {where}\n" for n, where in sorted(found["long"], reverse=True)), end="")
    print(f"functions over {MAX_PARAMS} parameters: {len(found['many'])}")
    print("".join(f"   {n} {where}\n" for n, where in sorted(found["many"], reverse=True)), end="")
    print(f"parameters typed Any in core, sweep, serve: {len(found['any'])}")
    if "-v" in argv:
        print("".join(f"   {where}\n" for where in sorted(found["any"])), end="")
    print(f"function-local imports of project modules (core, sweep, serve, bench): {len(found['local'])}")
    if "-v" in argv:
        print("".join(f"   {module}:{line}\n" for module, line in sorted(found["local"])), end="")
    print(f"upward arrows: {len(found['arrows'])}")
    print("".join(f"   {arrow}\n" for arrow in sorted(found["arrows"])), end="")
    found_cycles = cycles(found["graph"])
    print(f"import cycles (incl. function-local imports): {len(found_cycles)}")
    print("".join(f"   {' <-> '.join(c)}\n" for c in found_cycles), end="")
    part_cycles = cycles(found["parts"])
    print(f"import cycles between core's parts (subpackages and top modules): {len(part_cycles)}")
    print("".join(f"   {' <-> '.join(c)}\n" for c in part_cycles), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
