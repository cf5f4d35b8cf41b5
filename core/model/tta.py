"""Test-time augmentation: the mean softmax over the 8 flips and quarter turns of each image (the dihedral group).

A dermoscopic image has no up or left, so each of the 8 views is as valid as the original; averaging
their probabilities smooths out what the model learnt from orientation. ``DihedralMean`` wraps a model so that one
forward pass runs all 8 views of a batch at once on the device, and returns the log of the mean softmax: a softmax of
that is the mean itself, so core/training/loop.py's ``predict_split`` (and every command through
core/model/inference.py) predicts with TTA unchanged. Images must be square (they are: core/data/image_cache.py).
"""

from __future__ import annotations

import torch
from torch import nn

N_VIEWS = 8


def dihedral_views(x: torch.Tensor) -> torch.Tensor:
    """The 8 views of a batch [B, C, S, S] stacked view-major: [8 * B, C, S, S] (4 quarter turns, each mirrored)."""
    turns = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return torch.cat(turns + [torch.flip(t, dims=(3,)) for t in turns])


class DihedralMean(nn.Module):
    """``model`` averaged over the dihedral views of its input; its output is log(mean softmax)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        views = dihedral_views(x)
        if x.is_contiguous(memory_format=torch.channels_last):
            views = views.contiguous(memory_format=torch.channels_last)  # rot90 and cat drop the layout
        # a model with clinical fields sees each image's clinical fields with each of its views
        logits = self.model(views) if clinical is None else self.model(views, clinical.repeat(N_VIEWS, 1))
        probs = torch.softmax(logits.float(), dim=1)
        return probs.view(N_VIEWS, len(x), -1).mean(0).clamp_min(1e-30).log()
