"""The per-epoch work of a training run: one epoch of training steps.

``train_one_epoch`` takes everything it uses as arguments and returns the epoch's ``train_*`` figures; the
pass of predictions that validation shares with inference is core/model/forward.py's ``predict_split``.
core/train.py strings them together; nothing here writes a file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.training.augment import apply_mix, augment_batch, draw_mix, mix_rng, mixed_loss
from core.training.box_targets import batch_box_loss, mix_with_masks
from core.model.forward import forward
from core.config import TrainConfig
from core.device import Placement, gather_batch
from core.model.fields import drop_fields

if TYPE_CHECKING:
    from tqdm import tqdm


@dataclass(frozen=True)
class Batches:
    """The training images of one run on its device, and how they are cut into batches."""

    images: torch.Tensor           # uint8 [N, 3, S, S], the whole dataset
    labels: torch.Tensor           # int64 [N]
    train_idx: torch.Tensor        # int64 [T]: the training split's indices, on the device
    batch_size: int
    steps_per_epoch: int           # T // batch_size: the last partial batch is dropped (BatchNorm needs > 1)
    placement: Placement
    clinical: torch.Tensor | None = None        # float32 [N, D] encoded clinical fields (core/model/fields.py), or None
    fusion: dict | None = None                  # its encoding, for metadata_dropout
    masks: torch.Tensor | None = None           # uint8 [N, S, S] lesion masks for the box head (box_targets.py)
    has_mask: torch.Tensor | None = None        # bool [N] on the device: image i has a mask


@dataclass(frozen=True)
class Optimisation:
    """What a training step updates: the model (maybe compiled), its optimiser, schedule, loss and EMA."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: nn.Module
    ema: Any = None                # torch.optim.swa_utils.AveragedModel or None
    boxes: list | None = None      # the box head's outputs, appended by its hook (core/box_head.start_capture)


def train_one_epoch(opt: Optimisation, batches: Batches, order: torch.Tensor, cfg: TrainConfig,
                    generator: torch.Generator, progress: tqdm | None = None) -> dict[str, float]:
    """One epoch of steps over ``train_idx[order]``; returns train_loss, train_accuracy and its speed."""
    where = batches.placement
    opt.model.train()
    loss_sum = torch.zeros((), device=where.device)
    correct = torch.zeros((), device=where.device, dtype=torch.long)
    box_sum = torch.zeros((), device=where.device)   # the box head's loss (L1 + GIoU), unweighted
    started = time.perf_counter()
    size = batches.batch_size
    rng = mix_rng(cfg, generator)  # None without mixup/CutMix: the other draws stay as they were
    for step in range(batches.steps_per_epoch):
        idx = batches.train_idx[order[step * size:(step + 1) * size]]
        images = gather_batch(batches.images, idx, where.device)
        if batches.masks is None:
            x, masks = augment_batch(images, cfg, generator), None
        else:  # the masks move with their images (core/training/box_targets.py)
            x, masks = augment_batch(images, cfg, generator, gather_batch(batches.masks, idx, where.device))
        y = batches.labels[idx]
        clinical = _train_clinical(batches, idx, cfg, generator)
        mix = draw_mix(rng, cfg, x, generator) if rng is not None else None
        if mix is not None:
            if masks is not None:  # mixed as the pixels are
                x, masks, mix = mix_with_masks(x, masks, mix, rng)
            else:
                x, mix = apply_mix(x, mix, rng)
            clinical = None if clinical is None else torch.lerp(clinical[mix.perm], clinical, mix.lam)
        if masks is not None:
            opt.boxes.clear()   # (validation passes append theirs too)
        with torch.autocast(where.device.type, dtype=torch.bfloat16, enabled=where.bf16):
            logits = forward(opt.model, x.contiguous(memory_format=where.memory_format), clinical)
        loss = mixed_loss(opt.criterion, logits.float(), y, mix)
        if masks is not None:
            box = batch_box_loss(opt.boxes[-1], masks, batches.has_mask[idx], mix)
            box_sum += box.detach() * size
            loss = loss + cfg.box_loss_weight * box
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
    boxes = {"train_box_loss": box_sum.item() / seen} if batches.masks is not None else {}
    return {"train_loss": loss_sum.item() / seen, "train_accuracy": correct.item() / seen, **boxes,
            "train_images_per_s": seen / elapsed, "train_epoch_s": elapsed}


def _train_clinical(batches: Batches, idx: torch.Tensor, cfg: TrainConfig,
                    generator: torch.Generator) -> torch.Tensor | None:
    """The batch's encoded clinical fields with metadata_dropout applied; None for an image-only run."""
    if batches.clinical is None:
        return None
    return drop_fields(batches.clinical[idx], batches.fusion, cfg.metadata_dropout, generator)
