"""Where a run computes and how: the device, bf16 autocast, memory format, and the dataset on the device.

The whole decoded uint8 dataset is moved to the GPU once when it fits (else pinned host memory), so a
training step gathers its batch by index on the device: no JPEG is read and no DataLoader worker runs.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from core.errors import UserError

if TYPE_CHECKING:
    from core.config import TrainConfig


class ImagesAndLabels(Protocol):
    """What :func:`dataset_to_device` needs of a core.data.dataset.Dataset (a Protocol, so that this module, which
    core.data.dataset's image cache imports, does not import core.data.dataset back)."""

    @property
    def images(self) -> Any: ...     # uint8 [N, 3, S, S]
    @property
    def labels(self) -> Any: ...     # int [N]

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells it, e.g. under taskset or a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_device(cfg: "TrainConfig") -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("config key 'device' = 'cuda': no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def memory_format(channels_last: bool, device: torch.device, bf16: bool) -> torch.memory_format:
    """channels_last where it is fast: on CUDA, and on the CPU with bf16, where oneDNN's bf16 convolutions
    want it (fp32 on the CPU gains nothing from it)."""
    return torch.channels_last if channels_last and (device.type == "cuda" or bf16) else torch.contiguous_format


@dataclass(frozen=True)
class Placement:
    """Where and how a model computes: device, bf16 autocast or not, and the input memory format."""

    device: torch.device
    bf16: bool
    memory_format: torch.memory_format

    @classmethod
    def of(cls, device: torch.device, precision: str, channels_last: bool = True) -> "Placement":
        bf16 = use_bf16(precision, device)
        return cls(device=device, bf16=bf16, memory_format=memory_format(channels_last, device, bf16))


def as_tensor(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor view of uint8 images without a copy (arrays from Ray's object store are read-only)."""
    if isinstance(images_uint8, torch.Tensor):
        return images_uint8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-writable warning: nothing here writes to them
        return torch.from_numpy(np.asarray(images_uint8))


def dataset_to_device(data: ImagesAndLabels, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images and labels as tensors: on a GPU when they fit, else in host memory."""
    images = as_tensor(data.images)
    labels = torch.as_tensor(data.labels, dtype=torch.long, device=device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.numel() < 0.5 * free:
            return images.to(device), labels
        log.info("dataset (%.1f GB) kept in pinned host memory: it does not fit the GPU's free memory",
                 images.numel() / 1e9)
        return images.pin_memory(), labels
    return images, labels


def gather_batch(images: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    if images.device == device:
        return images[idx]
    return images[idx.cpu()].pin_memory().to(device, non_blocking=True)
