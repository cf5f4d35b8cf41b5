"""A lesion box from a Grad-CAM heat map, so that a model trained without the box head still localises.

    python -m core.final_train results/<sweep>/best.json     # chooses the fraction on val, stores it in model.pt

The map is thresholded at a fraction of its maximum, the largest connected region above it is kept
(``scipy.ndimage.label``, 8-connected) and its box taken (core/data/lesion_boxes.py, torchvision's
``masks_to_boxes``). The fraction is chosen on the validation split (:func:`choose_fraction`: the one of
``FRACTIONS`` with the highest mean IoU against the masks' boxes) and stored in model.pt; a model file without
one uses ``DEFAULT_FRACTION``. A map that is zero everywhere points nowhere: its box is the whole image.

MaxBoxAcc (Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020) is the
share of images whose box has IoU >= 0.5 with the truth at the best threshold for the set (:func:`box_accuracy`
gives that share per threshold, over ``MAX_BOX_ACC_THRESHOLDS``, the paper's 0.00, 0.01, ..., 0.99 of the map's
range after min-max normalisation). Its "V2" here is the mean of the best over IoU 0.3, 0.5 and 0.7, each
with the largest region's box (the paper's V2 also tries the box of every other region).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from core.data.lesion_boxes import WHOLE_IMAGE, ious, mask_boxes

FRACTIONS = tuple(round(f, 2) for f in np.arange(0.05, 1.0, 0.05))   # the candidates chosen from on val
DEFAULT_FRACTION = 0.2           # a model file without a fraction chosen on val (best.pt of core.train)
MAX_BOX_ACC_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.0, 1.0, 0.01))
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def stored_fraction(meta: Mapping[str, Any]) -> float:
    """The Grad-CAM box's fraction a model file stores (core.final_train chose it on val), else the default."""
    return float(((meta.get("boxes") or {}).get("cam_fraction")) or DEFAULT_FRACTION)


def largest_region(above: np.ndarray) -> np.ndarray:
    """bool [H, W]: the largest 8-connected region of ``above`` (all False where nothing is above)."""
    labels, count = ndimage.label(above, structure=EIGHT_CONNECTED)
    if count == 0:
        return np.zeros_like(above, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def cam_boxes(maps: np.ndarray, fraction: float) -> np.ndarray:
    """float32 [N, 4]: the box (fractions) of each map's largest region at or above ``fraction`` of its maximum."""
    maps = np.asarray(maps, dtype=np.float32)
    regions = np.zeros(maps.shape, dtype=bool)
    peak = maps.reshape(len(maps), -1).max(1) if len(maps) else np.zeros(0)
    for i, heat in enumerate(maps):
        if peak[i] > 0:
            regions[i] = largest_region(heat >= fraction * peak[i])
    boxes, nonempty = mask_boxes(regions)
    boxes = boxes.numpy()
    boxes[~nonempty.numpy()] = WHOLE_IMAGE
    return boxes


def choose_fraction(maps: np.ndarray, truth: np.ndarray, fractions: Sequence[float] = FRACTIONS) -> dict:
    """The fraction whose boxes have the highest mean IoU against ``truth`` [N, 4], with each candidate's mean."""
    means = {float(f): float(ious(cam_boxes(maps, f), truth).mean()) for f in fractions}
    best = max(means, key=means.get)
    return {"fraction": best, "mean_iou": means[best], "n_images": int(len(maps)), "candidates": means}


def box_accuracy(maps: np.ndarray, truth: np.ndarray, deltas: Sequence[float] = (0.3, 0.5, 0.7),
                 thresholds: Sequence[float] = MAX_BOX_ACC_THRESHOLDS) -> np.ndarray:
    """float64 [T, D]: the share of images whose largest-region box at threshold t (of the min-max normalised
    map) has IoU >= delta with ``truth``, for each threshold and delta."""
    maps = np.asarray(maps, dtype=np.float32)
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(1)[:, None, None], flat.max(1)[:, None, None]
    normalised = (maps - low) / np.where(high > low, high - low, 1.0)
    out = np.zeros((len(thresholds), len(deltas)))
    for t, threshold in enumerate(thresholds):
        # the normalised maps peak at 1, so a fraction of the maximum is the threshold itself
        overlap = ious(cam_boxes(normalised, threshold), truth)
        out[t] = [(overlap >= delta).mean() for delta in deltas]
    return out


def max_box_acc(maps: np.ndarray, truth: np.ndarray) -> dict:
    """MaxBoxAcc at IoU 0.5, its threshold, and the "V2" mean of the best over IoU 0.3, 0.5 and 0.7."""
    if len(maps) == 0:
        return {"max_box_acc": None, "threshold": None, "max_box_acc_v2": None}
    table = box_accuracy(maps, truth)
    best = table.max(0)
    return {"max_box_acc": float(best[1]), "threshold": MAX_BOX_ACC_THRESHOLDS[int(table[:, 1].argmax())],
            "max_box_acc_v2": float(best.mean()), "per_iou": {"0.3": float(best[0]), "0.5": float(best[1]),
                                                               "0.7": float(best[2])}}
