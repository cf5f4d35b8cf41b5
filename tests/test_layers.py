"""The packages' import arrows point one way: core/ imports none of sweep/, serve/ or bench/, sweep/ none of
serve/ or bench/ (a static scan of every import statement, function-local ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"core": {"sweep", "serve", "bench"}, "sweep": {"serve", "bench"}}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import in the file, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def test_the_scan_sees_function_local_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from sweep.report import refresh_sweep_page\n")
    assert imported_packages(module) == {("os", 1), ("sweep", 4)}


def test_core_never_imports_sweep_serve_or_bench_and_sweep_never_serve_or_bench() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {package}"
             for layer, forbidden in FORBIDDEN.items() for path in sorted((ROOT / layer).glob("*.py"))
             for package, line in imported_packages(path) if package in forbidden]
    assert wrong == []
    assert len(list((ROOT / "core").glob("*.py"))) > 30  # the scan read the real tree


def test_tests_import_bench_only_to_test_the_benchmarks() -> None:
    """Shared test helpers live in tests/ (bench/ may use them); only the benchmarks' own tests import bench/."""
    importers = {path.name for path in (ROOT / "tests").glob("*.py")
                 if any(package == "bench" for package, _ in imported_packages(path))}
    assert importers == {"test_bench_smoke.py"}
