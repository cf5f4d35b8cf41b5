"""The box around a lesion mask, as fractions of the image's sides: the one definition every box here uses.

Boxes are ``(x0, y0, x1, y1)`` fractions of the width and height, the outer edges of the lesion's outermost
pixels, so a box fits images of any size: ``pixel_box`` turns one into pixels of an image of a given size.
Used by the box head's targets (core/training/box_targets.py), the Grad-CAM box (core/explain/cam_boxes.py) and the
localisation scores (core/evaluation/localisation.py).
"""

from __future__ import annotations

import os
from typing import BinaryIO, Sequence

import numpy as np
import torch
from torchvision.ops import masks_to_boxes

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)


def mask_boxes(masks: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(boxes float32 [N, 4], nonempty bool [N])`` of masks [N, H, W] (lesion where true, or above a half).

    torchvision's ``masks_to_boxes`` gives the outer pixels' indices (x1, y1 the last pixel's), so one is
    added to reach their far edges; an empty mask's box is all zeros, and ``nonempty`` False.
    """
    masks = torch.as_tensor(np.asarray(masks)) if isinstance(masks, np.ndarray) else masks
    lesion = masks > 0.5 if masks.is_floating_point() else masks.bool()
    h, w = lesion.shape[-2:]
    pixels = masks_to_boxes(lesion)
    nonempty = lesion.flatten(1).any(1)
    edges = (pixels + pixels.new_tensor([0.0, 0.0, 1.0, 1.0])) / pixels.new_tensor([w, h, w, h])
    return torch.where(nonempty[:, None], edges, 0.0).float(), nonempty


def pixel_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """A fractions box in pixels of a ``width`` x ``height`` image (edges, so x1 - x0 is the box's width)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [round(x0 * width, 1), round(y0 * height, 1), round(x1 * width, 1), round(y1 * height, 1)]


def upright_size(source: str | os.PathLike[str] | BinaryIO) -> tuple[int, int]:
    """``(width, height)`` of an image file (a path or a file object) as it is shown: turned by its EXIF
    orientation, as core.data.image_cache.decode_image turns it before squashing it to the model's square."""
    from PIL import Image

    with Image.open(source) as image:
        width, height = image.size
        turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)   # the orientations that swap the sides
    return (height, width) if turned else (width, height)


def box_answer(box: Sequence[float] | None, width: int, height: int, source: str) -> dict | None:
    """A box as predict's JSON, /predict and KServe give it: in pixels of the uploaded image and in fractions."""
    if box is None:
        return None
    fractions = [round(float(v), 4) for v in box]
    return {"pixels": pixel_box(box, width, height), "fractions": fractions, "format": "x0, y0, x1, y1",
            "image_size": [int(width), int(height)], "source": source}


def ious(predicted: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """float64 [N]: the IoU of each predicted box with its own true box (torchvision's ``box_iou``, in chunks
    so that the N x N matrix it makes stays small)."""
    from torchvision.ops import box_iou

    predicted = torch.as_tensor(np.asarray(predicted), dtype=torch.float64)
    truth = torch.as_tensor(np.asarray(truth), dtype=torch.float64)
    out = [box_iou(predicted[i:i + chunk], truth[i:i + chunk]).diagonal() for i in range(0, len(truth), chunk)]
    return torch.cat(out).numpy() if out else np.zeros(0)
