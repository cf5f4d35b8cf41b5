"""Test isolation: every test session gets its own dataset cache and torch hub folder; one torch thread; one
local Ray shared by the tests that need no fresh one; and the grouping of `make test`'s two pytest-xdist workers.

Nothing here reads ``../shared``; tests that use the real HAM10000 copy request ``ham10000_path``,
which skips (with the reason) where the copy is absent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.paths import HAM10000, REPO

# core/ needs neither Ray nor Optuna. Where they are not installed at all (as on the GPU machine's image
# with its preinstalled torch), only the core tests run; an installed but broken Ray still fails loudly.
SWEEP_MISSING = [m for m in ("ray", "optuna") if importlib.util.find_spec(m) is None]
collect_ignore_glob = ["test_sweep_*.py"] if SWEEP_MISSING else []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sweep: runs sweep.run, so needs Ray and Optuna")


# The modules that start Ray (a local instance, a cluster or sweep.run processes). Under `make test`
# (pytest-xdist: `-n 2 --dist loadgroup`) they run one after another on one worker: two Ray instances at once
# would compete for the machine's two cores, and some assertions need their trials' timing (four trials started
# before the first ended; a sweep killed mid-trial). Every other module is a group of its own, so that its
# module-scoped fixtures (a trained run, a sweep) are built once, on one worker.
RAY_MODULES = {"test_bench_smoke", "test_model_sweep", "test_serve_ray", "test_sweep_cluster", "test_sweep_resume",
               "test_sweep_run", "test_sweep_storage", "test_sweep_storage_cluster"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which appends the group to each test's id
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SWEEP_MISSING:
        skip = pytest.mark.skip(reason=f"not installed: {', '.join(SWEEP_MISSING)}")
        for item in items:
            if "sweep" in item.keywords:
                item.add_marker(skip)
    # The modules using the shared local Ray run last, so that it is never up while another module runs: those
    # start their own Ray (sweep.run without --address), a cluster, or check that none runs in this process.
    shared = {Path(item.nodeid.split("::")[0]).stem for item in items if "local_ray" in item.fixturenames}
    items.sort(key=lambda item: Path(item.nodeid.split("::")[0]).stem in shared)  # stable: the order otherwise
    if config.pluginmanager.hasplugin("xdist") and config.getoption("dist", "no") == "loadgroup":
        for item in items:
            if item.get_closest_marker("xdist_group") is None:
                module = Path(item.nodeid.split("::")[0]).stem
                item.add_marker(pytest.mark.xdist_group("ray" if module in RAY_MODULES else module))


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


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """One torch thread in the test process (and in the commands the tests run in it, unless they set --threads).
    Why: the tests' models and images are tiny, so a second thread gains little even on an idle machine; and
    `make test` runs two pytest workers on the two cores, where a second thread each only spins while the other
    worker holds the core (on a busy 2-core machine, 1 thread made test_faults about 3x faster)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def local_ray() -> Iterator[Any]:
    """One local Ray (4 logical CPUs and 2 logical GPUs; trials train on the CPU) for every test that needs a Ray
    but not a fresh one: a start takes 10-25 s on the 2-core machine. Its modules run last (see
    pytest_collection_modifyitems) and it stops at the end of the session."""
    import ray

    # Trial processes import core/ and sweep/ from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    assert not ray.is_initialized()
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


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
