"""Bounded load on the model server (127.0.0.1 only): throughput, latency and errors, batched against a plain baseline.

    python -m bench.serve_load [--sizes 64 224] [--clients 1 4 16] [--requests 64] [--time-limit 20]
        [--soak 2000] [--out serve_load.json]

Writes random-init models (64 and 224 px by default, 7 classes, with a temperature) into a temporary folder,
then for each size starts, as its own process, each server:

- ``torch``: ``python -m serve`` (micro-batched; the default backend),
- ``onnx``: ``python -m serve --backend onnx``,
- ``ensemble`` (only when named in ``--servers``): ``python -m serve`` on an ensemble file of
  ``--ensemble-members`` such models (core/model/ensemble.py), its throughput beside one model's,
- ``baseline``: the FastAPI endpoint a user would write first, calling the model once per request
  (``def`` endpoint, so FastAPI runs each in its thread pool; no batching), here ``--baseline-server``;

and sends each ``--requests`` uploads (200x150 JPEGs, as the HAM10000 copy's) from 1, 4 and 16 concurrent
clients, each cell stopped after ``--time-limit`` s; ``explain=true`` (Guided Grad-CAM) with the torch
server. Then the soak: ``--soak`` mixed good and bad requests (bad: not an image, truncated, empty, wrong
type, decompression bomb, age out of range, a bad KServe tensor) at 8 clients against the 64 px torch
server: every status as expected, every good answer equal to core.model.inference's probabilities (1e-5),
and the server's resident memory before and after. Prints a table; every error counted.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from fastapi import FastAPI, UploadFile   # at module level: FastAPI resolves the endpoint's annotations here

from bench.common import REPO, bench_parser, command_line, machine_info, write_result

CLIENT_TIMEOUT_S = 120


def write_random_model(path: Path, image_size: int) -> Path:
    """A random-init ResNet-18 model file as core.final_train writes it (with a temperature, no thresholds)."""
    import torch

    from core.config import TrainConfig
    from core.data.layouts import HAM_CLASSES
    from core.model.networks import build_model, save_model_file

    torch.manual_seed(0)
    config = TrainConfig(image_size=image_size, pretrained="none", device="cpu").to_dict()
    save_model_file(path, build_model(len(HAM_CLASSES), "none"), HAM_CLASSES, config,
                    {"calibration": {"fitted_on": "val", "temperature": {"single": 1.5, "tta": 1.5}}})
    return path


def write_random_ensemble(path: Path, image_size: int, members: int) -> Path:
    """An ensemble file (core/model/ensemble.py) of ``members`` random-init ResNet-18s at ``image_size``, equal
    weights, with a temperature: what the ``ensemble`` server serves."""
    import torch

    from core.config import TrainConfig
    from core.model.ensemble import save_ensemble_file
    from core.data.layouts import HAM_CLASSES
    from core.model.networks import build_model, save_model_file

    config = TrainConfig(image_size=image_size, pretrained="none", device="cpu").to_dict()
    files = []
    for k in range(members):
        torch.manual_seed(k)
        save_model_file(path.parent / f"member{k}.pt", build_model(len(HAM_CLASSES), "none"), HAM_CLASSES, config)
        files.append((f"member{k}", path.parent / f"member{k}.pt", 1.0))
    save_ensemble_file(path, files, {"calibration": {"fitted_on": "val", "temperature": {"single": 1.5, "tta": 1.5}}})
    return path


def jpeg(seed: int, size: tuple[int, int] = (200, 150)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 10 + 1, size[0] // 10 + 1, 3), dtype=np.uint8)
    picture = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)   # smooth, photo-like, ~10 kB
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --- the plain baseline ------------------------------------------------------------------------------------

def baseline_app(model_path: str) -> Any:
    """What a user writes first: load the model, decode the upload, call the model, per request."""
    from core.data.image_cache import decode_image
    from core.model.loading import load_for_inference

    loaded = load_for_inference(model_path, "cpu")
    size = int(loaded.header["image_size"])
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/predict")
    def predict(file: UploadFile) -> dict[str, Any]:
        probs = loaded.predict(decode_image(io.BytesIO(file.file.read()), size)[None])[0]
        return {"probabilities": dict(zip(loaded.class_names, map(float, probs)))}

    return app


# --- servers -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(kind: str, model: Path, log_dir: Path) -> Iterator[tuple[str, int]]:
    """Start one server process (torch, onnx or baseline) on 127.0.0.1; yields (base URL, pid)."""
    import httpx

    port = free_port()
    if kind == "baseline":
        command = [sys.executable, "-m", "bench.serve_load", "--baseline-server", str(model), "--port", str(port)]
    else:
        command = [sys.executable, "-m", "serve", str(model), "--port", str(port), "--device", "cpu",
                   "--backend", "torch" if kind == "ensemble" else kind]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log_file = open(log_dir / f"{kind}-{model.parent.name}.log", "w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not start; see {log_file.name}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log_file.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- load --------------------------------------------------------------------------------------------------

async def load(url: str, images: Sequence[bytes], clients: int, requests: int, time_limit: float,
               explain: bool = False) -> dict[str, Any]:
    """``requests`` uploads from ``clients`` concurrent clients (stopped after ``time_limit`` s)."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    next_index = iter(range(requests))
    started = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_index:
            if time.perf_counter() - started > time_limit:
                return
            sent = time.perf_counter()
            try:
                answer = await http.post(f"{url}/predict", files={"file": (f"{i}.jpg", images[i % len(images)],
                                                                           "image/jpeg")},
                                         data={"explain": "true"} if explain else {})
                if answer.status_code != 200:
                    errors.append(f"{answer.status_code} {answer.text[:100]}")
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            latencies.append(time.perf_counter() - sent)

    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "wall_s": round(wall, 2),
            "req_per_s": round(len(latencies) / wall, 2), "p50_ms": _pct(ms, 50), "p95_ms": _pct(ms, 95),
            "p99_ms": _pct(ms, 99), "errors": len(errors), "error_examples": errors[:3]}


def _pct(ms: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(ms, q)), 1) if len(ms) else None


def batch_snapshot(url: str) -> tuple[float, float]:
    """(images, forward passes) of the server's micro-batcher so far, from /metrics; (0, 0) for the baseline."""
    import httpx

    answer = httpx.get(f"{url}/metrics", timeout=10)
    if answer.status_code != 200:
        return 0.0, 0.0
    values = {line.split()[0]: float(line.split()[1]) for line in answer.text.splitlines()
              if line.startswith("lesion_serve_batch_images_")}
    return values.get("lesion_serve_batch_images_sum", 0.0), values.get("lesion_serve_batch_images_count", 0.0)


def run_cells(url: str, kind: str, images: Sequence[bytes], args: Any) -> list[dict[str, Any]]:
    """Every client count (and, for torch, with explain) against one running server."""
    rows = []
    asyncio.run(load(url, images, 2, 4, args.time_limit))  # warm-up: first calls import and allocate
    plans = [(c, False) for c in args.clients] + ([(c, True) for c in args.clients] if kind == "torch" else [])
    for clients, explain in plans:
        before = batch_snapshot(url)
        row = asyncio.run(load(url, images, clients, args.requests, args.time_limit, explain))
        after = batch_snapshot(url)
        passes = after[1] - before[1]
        row.update(server=kind, explain=explain, mean_batch=round((after[0] - before[0]) / passes, 2) if passes else None)
        rows.append(row)
        print(f"  {kind:8} explain={str(explain):5} clients={clients:2}: {row['req_per_s']:7.2f} req/s  "
              f"p50 {row['p50_ms']} p95 {row['p95_ms']} p99 {row['p99_ms']} ms  errors {row['errors']}  "
              f"mean batch {row['mean_batch']}  ({row['requests']} requests)", flush=True)
    return rows


# --- soak --------------------------------------------------------------------------------------------------

def bad_requests(size: int) -> list[tuple[str, dict[str, Any], int]]:
    """(name, httpx.post keyword arguments, expected status) of each kind of bad request."""
    from serve.uploads import MAX_PIXELS

    good = jpeg(99)
    side = int(MAX_PIXELS ** 0.5) + 10
    return [
        ("not an image", {"files": {"file": ("a.jpg", b"plain text", "image/jpeg")}}, 400),
        ("truncated JPEG", {"files": {"file": ("a.jpg", good[:len(good) // 2], "image/jpeg")}}, 400),
        ("empty file", {"files": {"file": ("a.jpg", b"", "image/jpeg")}}, 400),
        ("wrong part type", {"files": {"file": ("a.jpg", good, "text/plain")}}, 415),
        ("bomb", {"files": {"file": ("b.png", _bomb(side), "image/png")}}, 413),
        ("age out of range", {"files": {"file": ("a.jpg", good, "image/jpeg")}, "data": {"age": "500"}}, 422),
        ("JSON body", {"json": {"file": "x"}}, 415),
        ("bad v2 tensor", {"json": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, size, size],
                                                "data": [1, 2]}]}, "path": "/v2/models/lesion-classifier/infer"}, 400),
    ]


def _bomb(side: int) -> bytes:
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


async def soak(url: str, pid: int, model: Path, count: int, clients: int = 8) -> dict[str, Any]:
    """``count`` mixed requests (60% good); every status as expected, every good answer correct."""
    import httpx

    from core.data.image_cache import decode_image
    from core.model.loading import load_for_inference

    loaded = load_for_inference(model, "cpu")
    size = int(loaded.header["image_size"])
    images = [jpeg(1000 + i) for i in range(16)]
    expected = loaded.predict(np.stack([decode_image(io.BytesIO(b), size) for b in images]))
    bad = bad_requests(size)
    rng = np.random.default_rng(0)
    plan = [int(rng.integers(len(images))) if rng.random() < 0.6 else -1 - int(rng.integers(len(bad)))
            for _ in range(count)]
    wrong: list[str] = []
    counts = {"good": 0, "bad": 0}
    rss_before = rss_mb(pid)
    queue = iter(plan)

    async def client(http: httpx.AsyncClient) -> None:
        for item in queue:
            if item >= 0:
                answer = await http.post(f"{url}/predict", files={"file": ("s.jpg", images[item], "image/jpeg")})
                probs = answer.json().get("probabilities", {}) if answer.status_code == 200 else {}
                got = [probs.get(c, -1.0) for c in loaded.class_names]
                ok = answer.status_code == 200 and np.allclose(got, expected[item], atol=1e-5)
                counts["good"] += 1
            else:
                name, kwargs, status = bad[-1 - item]
                kwargs = dict(kwargs)
                answer = await http.post(url + kwargs.pop("path", "/predict"), **kwargs)
                ok = answer.status_code == status and "error" in answer.json()
                counts["bad"] += 1
            if not ok:
                wrong.append(f"{item}: {answer.status_code} {answer.text[:120]}")

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return {"requests": count, **counts, "wrong": len(wrong), "wrong_examples": wrong[:5],
            "wall_s": round(time.perf_counter() - started, 1), "rss_mb_before": round(rss_before, 1),
            "rss_mb_after": round(rss_mb(pid), 1), "kinds_of_bad": [name for name, _, _ in bad]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench.serve_load", __doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--servers", nargs="+", default=["torch", "onnx", "baseline"],
                        choices=["torch", "onnx", "baseline", "ensemble"],
                        help="ensemble: python -m serve on an ensemble file of --ensemble-members random models")
    parser.add_argument("--ensemble-members", type=int, default=5, help="members of the ensemble server's file "
                                                                          "(default 5, as --ensemble-size)")
    parser.add_argument("--requests", type=int, default=64, help="requests per cell (default 64)")
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds per cell at most (default 20)")
    parser.add_argument("--soak", type=int, default=2000, help="mixed requests of the soak (0: none)")
    parser.add_argument("--baseline-server", metavar="MODEL", help=argparse_hidden())
    parser.add_argument("--port", type=int, default=8000, help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.baseline_server:
        import uvicorn

        uvicorn.run(baseline_app(args.baseline_server), host="127.0.0.1", port=args.port, log_level="warning")
        return 0
    import torch

    result: dict[str, Any] = {"command": command_line("bench.serve_load", argv),
                              "machine": machine_info(torch.device("cpu")), "cells": [], "soak": None}
    images = [jpeg(i) for i in range(16)]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder:
        root = Path(folder)
        for size in args.sizes:
            model = write_random_model(_mkdir(root / f"{size}px") / "model.pt", size)
            for kind in args.servers:
                print(f"{size} px, {kind} server (load average {os.getloadavg()[0]:.1f})", flush=True)
                served = model if kind != "ensemble" else write_random_ensemble(
                    root / f"{size}px" / "ensemble" / "ensemble.pt", size, args.ensemble_members)
                with server(kind, served, root) as (url, _):
                    result["cells"] += [{"size": size, **row} for row in run_cells(url, kind, images, args)]
        if args.soak:
            model = root / f"{args.sizes[0]}px" / "model.pt"
            with server("torch", model, root) as (url, pid):
                asyncio.run(load(url, images, 2, 20, args.time_limit))
                result["soak"] = asyncio.run(soak(url, pid, model, args.soak))
            print("soak:", json.dumps(result["soak"]), flush=True)
    result["machine"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    write_result(result, args.out)
    return 0 if all(c["errors"] == 0 for c in result["cells"]) and (not result["soak"] or not result["soak"]["wrong"]) else 1


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
