"""Test isolation: every test session gets its own dataset cache and torch hub folder.

Nothing here reads ``../shared``; tests that use the real HAM10000 copy request ``ham10000_path``,
which skips (with the reason) where the copy is absent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.paths import HAM10000

# core/ needs neither Ray nor Optuna. Where they are not installed at all (as on the GPU machine's image
# with its preinstalled torch), only the core tests run; an installed but broken Ray still fails loudly.
SWEEP_MISSING = [m for m in ("ray", "optuna") if importlib.util.find_spec(m) is None]
collect_ignore_glob = ["test_sweep_*.py"] if SWEEP_MISSING else []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sweep: runs sweep.run, so needs Ray and Optuna")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if SWEEP_MISSING:
        skip = pytest.mark.skip(reason=f"not installed: {', '.join(SWEEP_MISSING)}")
        for item in items:
            if "sweep" in item.keywords:
                item.add_marker(skip)


def pytest_report_header() -> list[str]:
    if SWEEP_MISSING:
        return [f"sweep tests not collected: {', '.join(SWEEP_MISSING)} not installed (core tests only)"]
    return []


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["LESION_SWEEP_CACHE"] = str(tmp_path_factory.mktemp("lesion-sweep-cache"))
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch-home"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for a module's shared fixtures (trained runs, sweeps), removed once the module is done unless a
    test has failed. Why: every run leaves ResNet-18 checkpoints (about 100 MB each), and kept until the session
    ends they added up to 8 GB per test session, enough to fill a CI machine's disk."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield folder
    if request.session.testsfailed == 0:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def ham10000_path() -> Path:
    if not (HAM10000 / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"the real HAM10000 copy is absent ({HAM10000})")
    return HAM10000
