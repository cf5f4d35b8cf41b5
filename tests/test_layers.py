"""The import arrows point one way (a static scan of every import statement, function-local ones included).

Between packages: core/ imports none of sweep/, serve/ or bench/; sweep/ none of serve/ or bench/.
Inside core/, each subpackage imports only what stands below it (CORE_ALLOWED; bench/code_shape.py reads the
same table): the shared modules at the top of core/ (errors, filenames, config, device) and io/ are the
floor; data/ and model/ stand on them; training/ and explain/ on model/ (and data/); evaluation/ on all of
those. No subpackage imports a command (train, final_train, evaluate, predict, download) or cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"core": {"sweep", "serve", "bench"}, "sweep": {"serve", "bench"}}
FLOOR = {"errors", "filenames", "config", "device"}   # top-of-core modules every subpackage may import
CORE_ALLOWED = {
    "io": {"errors"},
    "data": FLOOR | {"io"},
    "model": FLOOR | {"io"},
    "training": FLOOR | {"io", "data", "model"},
    "explain": FLOOR | {"io", "data", "model"},
    "evaluation": FLOOR | {"io", "data", "model", "explain"},
}


def imported_modules(path: Path) -> set[tuple[str, int]]:
    """(dotted module, line) of every import in the file, at any depth; `from a import b` gives a.b too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {(alias.name, node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module, node.lineno))
            found |= {(f"{node.module}.{alias.name}", node.lineno) for alias in node.names}
    return found


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import in the file."""
    return {(module.split(".")[0], line) for module, line in imported_modules(path)}


def core_part(module: str) -> str | None:
    """The part of core a dotted module belongs to: a subpackage's name, or a top-of-core module's name."""
    parts = module.split(".")
    return parts[1] if parts[0] == "core" and len(parts) > 1 else None


def test_the_scan_sees_function_local_and_nested_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from sweep.report import refresh_sweep_page\n"
                      "    from core.io import atomic\n")
    assert imported_packages(module) == {("os", 1), ("sweep", 4), ("core", 5)}
    assert ("core.io.atomic", 5) in imported_modules(module)


def test_core_never_imports_sweep_serve_or_bench_and_sweep_never_serve_or_bench() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {package}"
             for layer, forbidden in FORBIDDEN.items() for path in sorted((ROOT / layer).rglob("*.py"))
             for package, line in imported_packages(path) if package in forbidden]
    assert wrong == []
    assert len(list((ROOT / "core").rglob("*.py"))) > 40  # the scan read the real tree, subpackages included


def test_core_subpackages_import_only_what_stands_below_them() -> None:
    assert {p.name for p in (ROOT / "core").iterdir() if (p / "__init__.py").is_file()} == set(CORE_ALLOWED)
    wrong = []
    for package, allowed in CORE_ALLOWED.items():
        for path in sorted((ROOT / "core" / package).rglob("*.py")):
            for module, line in imported_modules(path):
                part = core_part(module)
                if part is not None and part != package and part not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert wrong == []


def test_tests_import_bench_only_to_test_the_benchmarks() -> None:
    """Shared test helpers live in tests/ (bench/ may use them); only the benchmarks' own tests import bench/."""
    importers = {path.name for path in (ROOT / "tests").glob("*.py")
                 if any(package == "bench" for package, _ in imported_packages(path))}
    assert importers == {"test_bench_smoke.py"}
