"""The forward pass that training, validation and inference share: ImageNet normalisation of uint8 images,
the model's logits (with the encoded clinical fields where the model takes them), and a pass of softmax
probabilities over a set of images on the run's device.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from core.device import Placement, gather_batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 255] float) images [B,3,H,W] -> float32 normalised with ImageNet statistics."""
    scale, shift = standardization(x.device)
    return torch.addcmul(shift, x.float(), scale)  # x / 255 standardised, in one pass


@functools.lru_cache(maxsize=None)
def constant(values: tuple, device: torch.device) -> torch.Tensor:
    # Built once per device: torch.tensor(..., device="cuda") is a blocking copy that waits for the GPU
    # to finish all queued work, which inside a training step would stall it every batch.
    return torch.tensor(values, dtype=torch.float32, device=device)


def standardization(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` [1,3,1,1] such that ``x * scale + shift`` is ``(x / 255 - mean) / std``."""
    scale = tuple(1 / (255 * s) for s in IMAGENET_STD)
    shift = tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    return constant(scale, device).view(1, 3, 1, 1), constant(shift, device).view(1, 3, 1, 1)



def forward(model: nn.Module, x: torch.Tensor, clinical: torch.Tensor | None) -> torch.Tensor:
    """The model's logits: images only, or with the encoded clinical fields where there is some."""
    return model(x) if clinical is None else model(x, clinical)


@torch.no_grad()
def predict_split(model: nn.Module, images: torch.Tensor, idx: np.ndarray, labels: torch.Tensor | None,
                  where: Placement, batch_size: int, clinical: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """Softmax probabilities [N, C] (float64) of ``images[idx]`` and, with labels, the plain cross-entropy.

    ``clinical``: the encoded clinical fields of all ``images`` (row i = image i) for a model with clinical fields,
    else None.
    """
    model.eval()
    idx_t = torch.as_tensor(idx, device=where.device)
    probs, loss_sum = [], torch.zeros((), device=where.device)
    for start in range(0, len(idx_t), batch_size):
        batch = idx_t[start:start + batch_size]
        x = normalize(gather_batch(images, batch, where.device)).contiguous(memory_format=where.memory_format)
        with torch.autocast(where.device.type, dtype=torch.bfloat16, enabled=where.bf16):
            logits = forward(model, x, None if clinical is None else clinical[batch]).float()
        if labels is not None:
            loss_sum += nn.functional.cross_entropy(logits, labels[batch], reduction="sum")
        probs.append(torch.softmax(logits, 1))
    out = torch.cat(probs).cpu().numpy().astype(np.float64)
    return out, loss_sum.item() / max(1, len(idx_t))
