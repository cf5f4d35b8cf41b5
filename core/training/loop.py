"""The per-epoch work of a training run: one epoch of training steps.

``train_one_epoch`` takes everything it uses as arguments and returns the epoch's ``train_*`` figures; the
pass of predictions that validation shares with inference is core/model/forward.py's ``predict_split``.
core/train.py strings them together; nothing here writes a file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.training.augment import apply_mix, augment_batch, draw_mix, mix_rng, mixed_loss
from core.model.forward import forward
from core.config import TrainConfig
from core.device import Placement, gather_batch
from core.model.fields import drop_fields


@dataclass(frozen=True)
class Batches:
    """The training images of one run on its device, and how they are cut into batches."""

    images: torch.Tensor           # uint8 [N, 3, S, S], the whole dataset
    labels: torch.Tensor           # int64 [N]
    train_idx: torch.Tensor        # int64 [T]: the training split's indices, on the device
    batch_size: int
    steps_per_epoch: int           # T // batch_size: the last partial batch is dropped (BatchNorm needs > 1)
    placement: Placement
    metadata: torch.Tensor | None = None        # float32 [N, D] encoded metadata (core/model/fields.py), or None
    metadata_spec: dict | None = None           # its encoding, for metadata dropout


@dataclass(frozen=True)
class Optimisation:
    """What a training step updates: the model (maybe compiled), its optimiser, schedule, loss and EMA."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: nn.Module
    ema: Any = None                # torch.optim.swa_utils.AveragedModel or None


def train_one_epoch(opt: Optimisation, batches: Batches, order: torch.Tensor, cfg: TrainConfig,
                    generator: torch.Generator, progress: Any = None) -> dict[str, float]:
    """One epoch of steps over ``train_idx[order]``; returns train_loss, train_accuracy and its speed."""
    where = batches.placement
    opt.model.train()
    loss_sum = torch.zeros((), device=where.device)
    correct = torch.zeros((), device=where.device, dtype=torch.long)
    started = time.perf_counter()
    size = batches.batch_size
    rng = mix_rng(cfg, generator)  # None without mixup/CutMix: the other draws stay as they were
    for step in range(batches.steps_per_epoch):
        idx = batches.train_idx[order[step * size:(step + 1) * size]]
        x = augment_batch(gather_batch(batches.images, idx, where.device), cfg, generator)
        y = batches.labels[idx]
        meta = _train_metadata(batches, idx, cfg, generator)
        mix = draw_mix(rng, cfg, x, generator) if rng is not None else None
        if mix is not None:
            x, mix = apply_mix(x, mix, rng)
            meta = None if meta is None else torch.lerp(meta[mix.perm], meta, mix.lam)
        with torch.autocast(where.device.type, dtype=torch.bfloat16, enabled=where.bf16):
            logits = forward(opt.model, x.contiguous(memory_format=where.memory_format), meta)
        loss = mixed_loss(opt.criterion, logits.float(), y, mix)
        opt.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        opt.optimizer.step()
        opt.scheduler.step()
        if opt.ema is not None:
            opt.ema.update_parameters(opt.model)
        # Accumulated on the device: reading them back every step would stall a GPU.
        loss_sum += loss.detach() * size
        correct += (logits.argmax(1) == y).sum()
        if progress is not None:
            progress.update(1)
    seen = batches.steps_per_epoch * size
    elapsed = time.perf_counter() - started
    return {"train_loss": loss_sum.item() / seen, "train_accuracy": correct.item() / seen,
            "train_images_per_s": seen / elapsed, "train_epoch_s": elapsed}


def _train_metadata(batches: Batches, idx: torch.Tensor, cfg: TrainConfig,
                    generator: torch.Generator) -> torch.Tensor | None:
    """The batch's encoded metadata with metadata dropout applied; None for an image-only run."""
    if batches.metadata is None:
        return None
    return drop_fields(batches.metadata[idx], batches.metadata_spec, cfg.metadata_dropout, generator)
