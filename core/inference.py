"""Use a trained model: load a model file for inference and predict class probabilities of uint8 images.

Every command that applies a model (core.evaluate, core.predict, core.final_train) goes through here,
so images are normalised, batched and cast exactly as in training (core/loop.py's ``predict_split``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from core.config import TrainConfig
from core.device import Placement, as_tensor, resolve_device
from core.errors import UserError
from core.loop import predict_split
from core.model import MODEL_ADVICE, load_model_file


@dataclass(frozen=True)
class LoadedModel:
    """A model file ready for inference."""

    model: nn.Module              # on ``device``, in eval mode
    meta: dict[str, Any]          # the file's metadata (class_names, image_size, config, epoch, ...)
    config: TrainConfig           # the config it was trained with, ``device`` replaced by the one asked for
    device: torch.device

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.meta["class_names"])

    def predict(self, images_uint8: np.ndarray | torch.Tensor) -> np.ndarray:
        return predict_probs(self.model, images_uint8, self.device, self.config.eval_batch_size, self.config.precision)


def load_for_inference(path: str | os.PathLike, device: str = "auto", advice: str = MODEL_ADVICE) -> LoadedModel:
    """Read a model file (model.pt, best.pt) onto ``device`` ('auto', 'cpu' or 'cuda'); ``advice``: what to do
    when it cannot be read."""
    model, meta = load_model_file(path, advice=advice)
    try:
        cfg = replace(TrainConfig.from_dict(meta.get("config") or {}), device=device)
    except UserError as exc:
        raise UserError(f"{path}: the model's config is not valid here ({exc})") from None
    torch_device = resolve_device(cfg)
    return LoadedModel(model=model.to(torch_device), meta=meta, config=cfg, device=torch_device)


def predict_probs(model: nn.Module, images_uint8: np.ndarray | torch.Tensor, device: str | torch.device = "cpu",
                  batch_size: int = 256, precision: str = "auto") -> np.ndarray:
    """Class probabilities [N, C] of a model for uint8 images [N, 3, S, S]."""
    where = Placement.of(torch.device(device), precision)
    images = as_tensor(images_uint8).to(where.device)
    probs, _ = predict_split(model.to(where.device), images, np.arange(len(images)), None, where, batch_size)
    return probs
