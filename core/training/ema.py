"""An exponential moving average of a model's weights and BatchNorm statistics (``TrainConfig.ema_decay``).

torch's ``AveragedModel`` with ``use_buffers=True`` keeps the average of every parameter and buffer, so the
averaged model's BatchNorm running statistics are averaged the same way as its weights (as timm's
ModelEmaV3 does) and it can be evaluated as it is, with no extra pass over the data. After ``n`` updates the
decay is ``min(decay, (1 + n) / (10 + n))``: early in training the average follows the model closely
instead of dragging its random initialisation along for thousands of steps. The step count lives on the
host (``n_averaged`` stays on the CPU), so an update never waits for the GPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def warmed_decay(decay: float, updates: int) -> float:
    return min(decay, (1 + updates) / (10 + updates))


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """The EMA of ``model`` (on its device); call ``ema.update_parameters(model)`` after every step."""
    ema = AveragedModel(model, use_buffers=True)  # n_averaged is created on the CPU: no device sync

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _n: torch.Tensor) -> None:
        weight = 1.0 - warmed_decay(decay, int(ema.n_averaged))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, weight)
        else:  # BatchNorm's num_batches_tracked: a counter, not something to average
            torch._foreach_copy_(averaged, current)

    ema.multi_avg_fn = update
    ema.requires_grad_(False)
    return ema
