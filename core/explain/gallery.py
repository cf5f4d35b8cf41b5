"""The Grad-CAM gallery figure: each example's image above its heat-map overlay, misclassified ones in red.

Written by ``python -m core.final_train`` and ``python -m core.evaluate`` (through core/explain/gradcam.py) with
matplotlib's Agg backend, saved atomically.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from core.io.atomic import save_figure  # noqa: E402



@dataclass(frozen=True)
class GalleryItem:
    """One example of a Grad-CAM gallery."""

    image: np.ndarray      # uint8 [H, W, 3]
    overlay: np.ndarray    # uint8 [H, W, 3], heat map blended over the image
    image_id: str
    true_name: str
    pred_name: str
    confidence: float      # predicted probability of pred_name
    mask: np.ndarray | None = None   # [H, W] lesion mask, outlined on the overlay when given


def gradcam_gallery_figure(class_name: str, items: Sequence[GalleryItem], path: str | os.PathLike,
                           per_row: int = 6) -> None:
    """Image above its Grad-CAM overlay for each example; misclassified ones titled in red."""
    blocks = max(1, math.ceil(len(items) / per_row))
    cols = max(1, math.ceil(len(items) / blocks))  # 8 examples: two rows of 4, not 6 + 2
    fig, axes = plt.subplots(2 * blocks, cols, figsize=(2.1 * cols, 4.7 * blocks + 0.6), squeeze=False,
                             layout="constrained")
    fig.get_layout_engine().set(h_pad=0.02, w_pad=0.02, hspace=0.0, wspace=0.02)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, item in enumerate(items):
        row, col = 2 * (k // cols), k % cols
        top, bottom = axes[row, col], axes[row + 1, col]
        top.imshow(item.image, interpolation="bilinear")
        bottom.imshow(item.overlay, interpolation="bilinear")
        if item.mask is not None and np.any(item.mask):
            bottom.contour(np.asarray(item.mask, dtype=float), levels=[0.5], colors="white", linewidths=1.0)
        wrong = item.pred_name != item.true_name
        top.set_title(f"{_short(item.image_id)}\ntrue {item.true_name}\npred {item.pred_name} "
                      f"({item.confidence:.2f})", fontsize=8, color="tab:red" if wrong else "black",
                      fontweight="bold" if wrong else "normal")
    if not items:
        axes[0, 0].text(0.5, 0.5, "no test images of this class", ha="center", va="center")
    n_wrong = sum(item.pred_name != item.true_name for item in items)
    mistakes = f"{n_wrong} misclassified (titled in red)" if n_wrong else "none misclassified"
    outlined = "; white line: the lesion mask" if any(item.mask is not None for item in items) else ""
    fig.suptitle(f"Grad-CAM, true class {class_name}: {len(items)} examples, {mistakes}\n"
                 f"top: image; below: heat map of the predicted class (red = most evidence){outlined}", fontsize=10)
    save_figure(fig, path)


def _short(text: str, width: int = 22) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
