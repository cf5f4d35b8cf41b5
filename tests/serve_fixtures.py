"""A small random-init model file for the serving tests (no training, no network), and images to send it."""

from __future__ import annotations

import contextlib
import io
import socket
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from core.config import TrainConfig
from core.data.layouts import HAM_CLASSES
from core.model.fields import make_spec
from core.model.networks import build_model, save_model_file
from core.evaluation.operating_points import KINDS, TARGETS

TEMPERATURE = 1.7   # far from 1, so that a test can tell calibrated from raw probabilities


def write_model(path: Path, image_size: int = 32, seed: int = 0, calibrated: bool = True,
                metadata: str = "none", pretrained: str = "none", box_head: bool = False,
                checks: bool = True) -> Path:
    """A ResNet-18 with random weights, saved as core.final_train saves model.pt (temperature, mel thresholds,
    with ``checks`` the out-of-distribution statistics and abstention rule fitted on :func:`lesion_like` images);
    ``metadata``: the clinical-field fusion (config key ``metadata``); ``pretrained``: what the config
    records as the initial weights (the weights stay random); ``box_head``: with a lesion box head."""
    torch.manual_seed(seed)
    model = build_model(len(HAM_CLASSES), "none", fusion=make_spec(metadata), box_head=box_head)
    config = TrainConfig(image_size=image_size, pretrained=pretrained, device="cpu", metadata=metadata).to_dict()
    points = [{"kind": kind, "target": target, "threshold": 0.05 + 0.1 * i, "sensitivity": 0.9, "specificity": 0.5}
              for i, (kind, target) in enumerate((k, t) for k in KINDS for t in TARGETS)]
    extra = {"epoch": 3, "operating_points": {
        "positive_class": "mel", "chosen_on": "val", "n_images": 50, "n_positive": 9,
        "modes": {mode: {"auc": 0.7, "points": points}
                  for mode in ("single/calibrated", "single/raw", "tta/calibrated", "tta/raw")}}}
    if calibrated:
        extra["calibration"] = {"fitted_on": "val", "n_images": 50,
                                "temperature": {"single": TEMPERATURE, "tta": TEMPERATURE + 0.1}}
    if checks:
        extra.update(fitted_checks(model, image_size, TEMPERATURE if calibrated else None))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_file(path, model, HAM_CLASSES, config, extra)
    return path


def lesion_like(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, 3, S, S]: a dark brown ellipse on smooth skin-coloured ground, a little noise: the "training
    images" the fixture's out-of-distribution statistics are fitted on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        skin = rng.uniform([190, 130, 110], [230, 170, 150])
        lesion = rng.uniform([70, 40, 25], [120, 80, 60])
        cy, cx, ry, rx = rng.uniform(0.35, 0.65, 2).tolist() + rng.uniform(0.15, 0.3, 2).tolist()
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        pixels = np.where(inside[..., None], lesion, skin) + rng.normal(0, 6, (size, size, 3))
        images.append(np.clip(pixels, 0, 255).astype(np.uint8).transpose(2, 0, 1))
    return np.stack(images)


def fitted_checks(model: torch.nn.Module, image_size: int, temperature: float | None, n: int = 70) -> dict:
    """model.pt's ``ood`` and ``abstention`` fitted on ``n`` lesion_like images with labels 0..6 in turn."""
    from core.model.checked_prediction import fit_checks
    from core.model.inference import predict_probs
    from core.model.ood import capture

    images, labels = lesion_like(n, image_size, seed=99), np.arange(n) % len(HAM_CLASSES)
    with capture(model) as seen:
        raw = predict_probs(model.eval(), images)
    return fit_checks(labels, {"single": raw}, {"single": temperature}, seen, HAM_CLASSES)


def image_bytes(size: tuple[int, int] = (60, 45), seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A noisy RGB image file's bytes (JPEG by default)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small valid PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    data = bytearray(image_bytes((8, 8), fmt="PNG"))
    ihdr = 8 + 8   # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


@contextlib.contextmanager
def running_server(app: object) -> Iterator[str]:
    """uvicorn serving ``app`` on a free 127.0.0.1 port in a thread; yields its base URL, stops it after."""
    import threading

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # timeout_graceful_shutdown: a browser may keep a connection open; without it the stop waited for it (30 s)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
