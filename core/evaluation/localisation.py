"""Where is the lesion: the evaluation's boxes scored against the boxes of the dermatologists' lesion masks.

    python -m core.evaluate model.pt --data PATH --out DIR      # metrics.json "localisation", report, boxes.png

On the evaluated images that have a lesion mask, four boxes are scored against the box around the mask
(core/data/lesion_boxes.py): the box head's (core/model/box_head.py; a model trained with ``box_loss_weight`` > 0), the
Grad-CAM map's (core/explain/cam_boxes.py; its threshold fraction chosen on the validation split by core.final_train
and stored in model.pt), the **centre prior** (the mean mask box of the training split, the same box for every
image: what knowing nothing of the image gives) and the **whole image**. For each: the mean IoU and the share
of images with IoU >= 0.3, 0.5 and 0.7; for the Grad-CAM box also MaxBoxAcc (Choe et al., CVPR 2020).
``boxes.png`` draws the boxes on some of the images. What is fitted on val (:func:`fit_boxes`) goes into
model.pt's ``boxes``; core.evaluate reads it back from there.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from core.explain.cam_boxes import DEFAULT_FRACTION, cam_boxes, choose_fraction, max_box_acc, stored_fraction
from core.evaluation.report import Table
from core.data.lesion_boxes import WHOLE_IMAGE, ious, mask_boxes

log = logging.getLogger(__name__)

IOU_LEVELS = (0.3, 0.5, 0.7)
FIGURE = "boxes.png"
FIGURE_IMAGES = 16
KINDS = {"head": "box head", "gradcam": "Grad-CAM box", "centre_prior": "centre prior (mean training box)",
         "whole_image": "whole image"}
COLOURS = {"truth": "white", "head": "lime", "gradcam": "cyan"}


def box_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Mean IoU and the share of images at or above each IoU level."""
    overlap = ious(predicted, truth)
    if len(overlap) == 0:
        return {"n_images": 0, "mean_iou": None, **{f"iou_{level}": None for level in IOU_LEVELS}}
    return {"n_images": int(len(overlap)), "mean_iou": float(overlap.mean()),
            **{f"iou_{level}": float((overlap >= level).mean()) for level in IOU_LEVELS}}


def centre_prior(masks: np.ndarray, has_mask: np.ndarray) -> list[float] | None:
    """The mean box of the masks (those with a lesion in them); None without any."""
    boxes, nonempty = mask_boxes(np.asarray(masks)[np.asarray(has_mask, dtype=bool)])
    if not bool(nonempty.any()):
        return None
    return [float(v) for v in boxes[nonempty].mean(0)]


def fit_boxes(maps: np.ndarray | None, truth: np.ndarray | None, prior: list[float] | None,
              method: str | None) -> dict[str, Any]:
    """model.pt's ``boxes``: the Grad-CAM fraction chosen on val's ``maps`` against their ``truth`` boxes (None:
    the default), and the centre ``prior`` (from the training split)."""
    fitted: dict[str, Any] = {"centre_prior": prior, "cam_fraction": DEFAULT_FRACTION, "cam_fraction_chosen_on": None,
                              "cam_method": method}
    if maps is not None and truth is not None and len(maps):
        choice = choose_fraction(maps, truth)
        fitted.update(cam_fraction=choice["fraction"], cam_fraction_chosen_on="val",
                      cam_fraction_val_mean_iou=choice["mean_iou"], cam_fraction_val_images=choice["n_images"])
        log.info("Grad-CAM box: threshold at %.2f of the map's maximum (mean IoU %.3f on %d validation images)",
                 choice["fraction"], choice["mean_iou"], choice["n_images"])
    return fitted


def localisation_section(masks: np.ndarray, head: np.ndarray | None, maps: np.ndarray | None,
                         fitted: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """metrics.json's ``localisation`` for the images with a (non-empty) lesion mask; None without any.

    ``masks`` [M, H, W] of those images; ``head`` their box head boxes (None: no head); ``maps`` their Grad-CAM
    maps (None: no Grad-CAM); ``fitted``: model.pt's ``boxes`` (None: a file without it).
    """
    truth, nonempty = mask_boxes(masks)
    keep = nonempty.numpy()
    if not keep.any():
        return None
    truth = truth.numpy()[keep]
    fitted = dict(fitted or {})
    boxes: dict[str, Any] = {}
    if head is not None:
        boxes["head"] = box_scores(np.asarray(head)[keep], truth)
    extra: dict[str, Any] = {}
    if maps is not None:
        fraction = stored_fraction({"boxes": fitted})
        boxes["gradcam"] = {**box_scores(cam_boxes(np.asarray(maps)[keep], fraction), truth), "fraction": fraction,
                            "fraction_chosen_on": fitted.get("cam_fraction_chosen_on") or "default (none stored)"}
        extra["max_box_acc"] = max_box_acc(np.asarray(maps)[keep], truth)
    prior = fitted.get("centre_prior")
    if prior is not None:
        boxes["centre_prior"] = {**box_scores(np.tile(prior, (len(truth), 1)), truth), "box": list(prior)}
    boxes["whole_image"] = box_scores(np.tile(WHOLE_IMAGE, (len(truth), 1)), truth)
    return {"n_images": int(len(truth)), "truth": "the box around each image's lesion mask",
            "iou_levels": list(IOU_LEVELS), "boxes": boxes, **extra, "figure": FIGURE}


def localisation_table(section: Mapping[str, Any] | None) -> Table | None:
    """The report's table of the ``localisation`` section."""
    if not section:
        return None
    rows = []
    for kind, scores in section["boxes"].items():
        chosen = ("chosen on val" if scores.get("fraction_chosen_on") == "val" else "the default: the model file "
                  "stores none")
        label = KINDS[kind] + (f" (threshold {scores['fraction']:.2f} of the map's maximum, {chosen})"
                               if kind == "gradcam" else "")
        rows.append([label, str(scores["n_images"]), _num(scores["mean_iou"]),
                     *(_pct(scores[f"iou_{level}"]) for level in IOU_LEVELS)])
    notes = []
    acc = section.get("max_box_acc")
    if acc and acc["max_box_acc"] is not None:
        notes.append(f"Grad-CAM MaxBoxAcc (Choe et al. 2020; IoU >= 0.5 at the best threshold for the set, "
                     f"{acc['threshold']:.2f} of the map's range): {_pct(acc['max_box_acc'])}; the mean over IoU 0.3, "
                     f"0.5 and 0.7: {_pct(acc['max_box_acc_v2'])}.")
    if "centre_prior" not in section["boxes"]:
        notes.append("No centre prior: the model file stores none (core.final_train stores the training split's).")
    return Table(title="Where is the lesion: boxes against the lesion masks' boxes",
                 header=["box", "images", "mean IoU", "IoU >= 0.3", "IoU >= 0.5", "IoU >= 0.7"], rows=rows,
                 intro=f"On the {section['n_images']} evaluated images with a lesion mask, each box against the box "
                       f"around the mask (`{FIGURE}` draws them: white the mask's, green the box head's, cyan the "
                       f"Grad-CAM box).", notes=notes)


def box_figure(images: np.ndarray, masks: np.ndarray, boxes: Mapping[str, np.ndarray],
               titles: Sequence[str], path: str | os.PathLike) -> None:
    """Up to FIGURE_IMAGES images [K, 3, H, W] with the mask's box (white) and each of ``boxes`` drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from core.io.atomic import save_figure

    n = min(len(images), FIGURE_IMAGES)
    cols = min(n, 4) or 1
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows + 0.6), squeeze=False)
    truth = mask_boxes(masks[:n])[0].numpy()
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        image = np.asarray(images[k]).transpose(1, 2, 0)
        h, w = image.shape[:2]
        ax.imshow(image, extent=(0, w, h, 0))
        for kind, drawn in [("truth", truth), *boxes.items()]:
            x0, y0, x1, y1 = np.asarray(drawn[k], dtype=float) * [w, h, w, h]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.6, edgecolor=COLOURS.get(kind, "red"),
                                   linestyle="-" if kind != "truth" else "--"))
        ax.set_title(titles[k], fontsize=7)
    legend = ", ".join(f"{COLOURS[kind]}: {'lesion mask' if kind == 'truth' else KINDS[kind]}"
                       for kind in ("truth", *boxes))
    fig.suptitle(f"Boxes on {n} evaluated images ({legend})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches=None)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"
