"""The box head: where the lesion is, as a box, read from the same pooled features as the classifier.

    python -m core.train --data PATH --out DIR --set box_loss_weight=1     # trains one (core/training/box_targets.py)

:class:`BoxHead` is one linear layer on the input of the classifier's last linear layer: the pooled image features (a
model with clinical fields: the backbone's pooled features, before age, sex and site are fused in; MobileNetV3: the
1280-wide hidden layer of its classifier). It gives the box as ``(cx, cy, w, h)`` fractions of the image's sides
through a sigmoid (so every box lies in the image and starts, untrained, as its middle half), returned as
``(x0, y0, x1, y1)`` fractions (torchvision's ``box_convert``).

``model(x)`` still returns the logits alone, so ONNX export, Grad-CAM and every other caller see the classifier
they know. The box comes from the same forward pass through :func:`capture_boxes`: inside it, a forward
pre-hook on that layer runs the head on what the layer receives; outside it no hook is registered.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_convert

from core.model.tta import N_VIEWS

ATTRIBUTE = "box_head"   # the model's attribute (and state_dict prefix) holding the head


class BoxHead(nn.Module):
    """Pooled features [B, F] -> boxes [B, 4], (x0, y0, x1, y1) as fractions of the image's width and height."""

    def __init__(self, features: int, slot: tuple[Any, ...]) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 4)
        self.slot = tuple(slot)   # where the model's classifier layer is (attributes and indices): the hook's place

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        cxcywh = torch.sigmoid(self.linear(pooled.flatten(1)).float())
        return box_convert(cxcywh, "cxcywh", "xyxy").clamp(0.0, 1.0)


def box_head_of(model: nn.Module) -> BoxHead | None:
    """The model's box head; None for a model without one."""
    head = getattr(_unwrap(model), ATTRIBUTE, None)
    return head if isinstance(head, BoxHead) else None


@contextmanager
def capture_boxes(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the box head's output [B, 4] of each forward pass run inside the block, in order.

    ``model`` may be the model itself or a wrapper that calls it (core/model/tta.py's DihedralMean, an EMA's
    ``module``); a model without a box head collects nothing.
    """
    got, handle = start_capture(model)
    try:
        yield got
    finally:
        if handle is not None:
            handle.remove()


def start_capture(model: nn.Module) -> tuple[list[torch.Tensor], Any]:
    """:func:`capture_boxes` without the block: ``(the list it fills, the hook's handle)``; ``handle.remove()``
    ends it. A training run registers it once (core/train.py): a hook that came and went every step would make
    torch.compile compile again and again. ``(list, None)`` for a model without a box head."""
    got: list[torch.Tensor] = []
    found = _find_head(model)
    if found is None:
        return got, None
    owner, head = found
    slot = owner
    for step in head.slot:
        slot = slot[step] if isinstance(step, int) else getattr(slot, step)
    return got, slot.register_forward_pre_hook(lambda module, args: got.append(head(args[0])))


def view_boxes(got: list[torch.Tensor], tta: bool = False) -> np.ndarray | None:
    """float32 [N, 4]: the boxes :func:`capture_boxes` collected, of the images as given; None when none was.

    With TTA (core/model/tta.py) each pass ran the 8 views of its batch, view-major, the first view the images as
    they are: its rows are the boxes of the images (a box of a turned view would be of the turned image).
    """
    if not got:
        return None
    return torch.cat([g[:len(g) // N_VIEWS] if tta else g for g in got]).detach().float().cpu().numpy()


def _find_head(model: nn.Module) -> tuple[nn.Module, BoxHead] | None:
    """The module holding the box head: the model, or the model a wrapper calls (torch.compile's ``_orig_mod``,
    DihedralMean's ``model``, an EMA's ``module``). Not deeper: an ensemble's members' heads are not its own."""
    for module in (model, _unwrap(model), getattr(model, "model", None), getattr(model, "module", None)):
        head = getattr(module, ATTRIBUTE, None)
        if isinstance(head, BoxHead):
            return module, head
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module
