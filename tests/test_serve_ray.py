"""One Ray Serve smoke test: the same app through ``serve.run`` on a local Ray (the session's shared one,
conftest.py), answered over HTTP, then shut down."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serving extras are not installed (pip install fastapi uvicorn ...)")

from serve.service import ServeOptions
from tests.serve_fixtures import image_bytes, write_model

serve = pytest.importorskip("ray.serve", reason="Ray Serve cannot be imported (pip install 'ray[serve]')")


def test_the_app_runs_under_ray_serve(local_ray, tmp_path: Path) -> None:
    from serve.ray_app import APP_NAME, build_application

    model = write_model(tmp_path / "model.pt", image_size=32)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(model, ServeOptions(device="cpu"), {"api_key": "k"}), name=APP_NAME,
                  route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/ready", timeout=30).json()["ready"] is True
        answer = httpx.post(f"{base}/predict", files={"file": ("a.jpg", image_bytes(), "image/jpeg")},
                            headers={"X-API-Key": "k"}, timeout=60)
        assert answer.status_code == 200 and abs(sum(answer.json()["probabilities"].values()) - 1) < 1e-6
        bad = httpx.post(f"{base}/predict", files={"file": ("a.jpg", b"nope", "image/jpeg")},
                         headers={"X-API-Key": "k"}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"].startswith("a.jpg: not an image")
        assert httpx.get(f"{base}/info", timeout=30).status_code == 401
    finally:
        serve.shutdown()  # Ray itself stays: the session's shared one (conftest.py)
