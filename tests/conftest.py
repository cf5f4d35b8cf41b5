"""Test isolation: every test session gets its own dataset cache and torch hub folder; one torch thread; one
local Ray shared by the tests that need no fresh one (its modules run last).

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


# The modules that use the shared local Ray (``local_ray`` below), found at collection.
SHARED_RAY_MODULES: set[str] = set()


def _module(item: pytest.Item) -> str:
    return Path(item.nodeid.split("::")[0]).stem


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if SWEEP_MISSING:
        skip = pytest.mark.skip(reason=f"not installed: {', '.join(SWEEP_MISSING)}")
        for item in items:
            if "sweep" in item.keywords:
                item.add_marker(skip)
    # The modules using the shared local Ray run one after another and last: it starts once, and seldom stands
    # in the way of a module that starts its own Ray or a cluster (``_no_shared_ray`` stops it for those).
    # Under `make test` (pytest-xdist, -n 2 --dist loadfile: each module whole on one worker, so that its
    # module-scoped fixtures are built once) a worker starts it again only where another module came between.
    # (--dist loadgroup, which could keep them on one worker, does nothing with pytest 9.2 and pytest-xdist 3.8:
    # xdist marks a group in Node._nodeid, which pytest 9 no longer reads.)
    SHARED_RAY_MODULES.update(_module(item) for item in items if "local_ray" in item.fixturenames)
    items.sort(key=lambda item: _module(item) in SHARED_RAY_MODULES)  # stable: the order otherwise


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
    Why: `make test` runs two pytest workers on the two cores, where a second thread each would only compete with
    the other worker (test_faults' note, which this replaces: on a busy 2-core machine, 1 thread made it about
    3x faster)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_SHARED_RAY: list[Any] = []  # the ray module while the shared local Ray runs


@pytest.fixture(scope="module")
def local_ray() -> Any:
    """One local Ray (4 logical CPUs and 2 logical GPUs; trials train on the CPU) for the tests that need a Ray but
    not a fresh one: a start took 12-24 s on the loaded 2-core machine. It runs until a module that does not use it
    starts (``_no_shared_ray``) or the session ends."""
    import ray

    if _SHARED_RAY and not ray.is_initialized():  # a test shut it down
        _SHARED_RAY.clear()
    if not _SHARED_RAY:
        # Trial processes import core/ and sweep/ from this checkout.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        assert not ray.is_initialized()
        ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
        _SHARED_RAY.append(ray)
    return ray


def _stop_shared_ray() -> None:
    if _SHARED_RAY:
        _SHARED_RAY.pop().shutdown()


@pytest.fixture(autouse=True, scope="module")
def _no_shared_ray(request: pytest.FixtureRequest) -> None:
    """The shared Ray stops before a module that does not use it: such a module starts its own Ray (sweep.run
    without --address would join this one), a cluster, or checks that none runs in this process. Autouse, so
    set up before the module's other module-scoped fixtures (a sweep run in a fixture)."""
    if request.module is not None and Path(request.module.__file__).stem not in SHARED_RAY_MODULES:
        _stop_shared_ray()


def pytest_sessionfinish() -> None:
    _stop_shared_ray()


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
