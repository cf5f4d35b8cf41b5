"""Ray processes of the cluster tests (tests/test_sweep_cluster.py, tests/test_sweep_storage_cluster.py): Ray's
files in a temp folder of the test's own, a free port for a head node, and stopping one ``ray start``.

A test takes the folder as the ``ray_tmpdir`` fixture (``from tests.ray_processes import ray_tmpdir  # noqa:
F401``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest


@pytest.fixture
def ray_tmpdir(monkeypatch: pytest.MonkeyPatch):
    folder = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(pgid: int) -> None:
    """Stop the processes of one ``ray start`` (its own session: ``ray stop`` would stop every Ray here)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
