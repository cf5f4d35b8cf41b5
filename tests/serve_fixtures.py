"""A small random-init model file for the serving tests (no training, no network), and images to send it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.config import TrainConfig
from core.layouts import HAM_CLASSES
from core.model import build_model, save_model_file
from core.operating_points import KINDS, TARGETS

TEMPERATURE = 1.7   # far from 1, so that a test can tell calibrated from raw probabilities


def write_model(path: Path, image_size: int = 32, seed: int = 0, calibrated: bool = True) -> Path:
    """A ResNet-18 with random weights, saved as core.final_train saves model.pt (temperature, mel thresholds)."""
    torch.manual_seed(seed)
    model = build_model(len(HAM_CLASSES), "none")
    config = TrainConfig(image_size=image_size, pretrained="none", device="cpu").to_dict()
    points = [{"kind": kind, "target": target, "threshold": 0.05 + 0.1 * i, "sensitivity": 0.9, "specificity": 0.5}
              for i, (kind, target) in enumerate((k, t) for k in KINDS for t in TARGETS)]
    extra = {"epoch": 3, "operating_points": {
        "positive_class": "mel", "chosen_on": "val", "n_images": 50, "n_positive": 9,
        "modes": {mode: {"auc": 0.7, "points": points}
                  for mode in ("single/calibrated", "single/raw", "tta/calibrated", "tta/raw")}}}
    if calibrated:
        extra["calibration"] = {"fitted_on": "val", "n_images": 50,
                                "temperature": {"single": TEMPERATURE, "tta": TEMPERATURE + 0.1}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_file(path, model, HAM_CLASSES, config, extra)
    return path


def image_bytes(size: tuple[int, int] = (60, 45), seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A noisy RGB image file's bytes (JPEG by default)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()
