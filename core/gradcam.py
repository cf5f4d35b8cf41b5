"""Grad-CAM heat maps with Captum: where in an image the model found the evidence for a class.

Captum's ``LayerGradCam`` on the last residual block (``core.model.gradcam_layer``), with ReLU as
in the paper, upsampled to the image's size by ``LayerAttribution.interpolate`` (bilinear). Captum
registers its hooks for each ``attribute`` call and removes them when the call ends, so the model
is left as it was. At small image sizes the block's map is coarse (2x2 at 64 px, 7x7 at 224 px):
the heat map can only be as sharp as that.

Used by ``core.final_train``, ``core.evaluate`` (the galleries) and ``core.predict --gradcam DIR``.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from core.augment import normalize
from core.figures import GalleryItem, gradcam_gallery_figure
from core.model import gradcam_layer

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.6


def gradcam_maps(model: nn.Module, images_uint8: np.ndarray | torch.Tensor, targets: Sequence[int],
                 device: str | torch.device = "cpu", batch_size: int = 64) -> np.ndarray:
    """Heat maps [N, H, W] in [0, 1] (each scaled by its maximum) for class ``targets[i]`` of image ``i``."""
    device = torch.device(device)
    images = torch.as_tensor(np.asarray(images_uint8)) if not isinstance(images_uint8, torch.Tensor) else images_uint8
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    model = model.to(device).eval()
    cam = LayerGradCam(model, gradcam_layer(model))
    size = tuple(images.shape[-2:])
    out = np.zeros((len(images), *size), dtype=np.float32)
    with torch.enable_grad():  # callers may sit inside no_grad; Grad-CAM needs the gradients
        for start in range(0, len(images), batch_size):
            x = normalize(images[start:start + batch_size].to(device))
            target = torch.as_tensor(list(targets[start:start + batch_size]), dtype=torch.long, device=device)
            attribution = cam.attribute(x, target=target, relu_attributions=True)
            if start == 0 and attribution.shape[-2:] == (1, 1):
                log.warning("at %d px the last residual block's map is 1x1, so Grad-CAM cannot localise "
                            "anything (each heat map is flat); use images of 48 px or more", size[0])
            upsampled = LayerAttribution.interpolate(attribution, size, interpolate_mode="bilinear")
            out[start:start + len(x)] = upsampled[:, 0].detach().float().cpu().numpy()
    peak = out.reshape(len(out), -1).max(1) if len(out) else np.zeros(0)
    scale = np.where(peak > 0, peak, 1.0).astype(np.float32)
    return out / scale[:, None, None]


def map_side(image_size: int) -> int:
    """Side of ResNet-18's last-block map for square images of ``image_size`` px (five stride-2 stages)."""
    side = image_size
    for _ in range(5):
        side = -(-side // 2)
    return side


def coarse_map_note(image_size: int) -> str | None:
    """A warning for report.md where the Grad-CAM map is too coarse to say much (below 4x4)."""
    side = map_side(image_size)
    if side >= 4:
        return None
    return (f"At {image_size} px the last residual block's map is {side}x{side}, so each Grad-CAM heat map is "
            f"that grid, smoothly upsampled: it can point at a part of the image at best, and maps this coarse "
            f"often show the network's position bias more than the lesion. Train at 128 px or more (4x4 and "
            f"finer) for heat maps worth reading.")


def overlay(image_uint8: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The heat map (jet colours) blended over an image; image [3,H,W] or [H,W,3] uint8 -> [H,W,3] uint8.

    The blend is strongest where the map is hot (``alpha``) and light where it is cold (a third of it),
    so the lesion stays visible wherever the model did not look.
    """
    from matplotlib import colormaps

    image = _hwc(image_uint8).astype(np.float32)
    heat = np.clip(heat, 0.0, 1.0)
    colors = colormaps["jet"](heat)[..., :3] * 255.0
    weight = (alpha * (1 + 2 * heat) / 3)[..., None]
    return np.clip((1 - weight) * image + weight * colors, 0, 255).astype(np.uint8)


def save_overlay(image_uint8: np.ndarray, heat: np.ndarray, path: str | os.PathLike, min_side: int = 224) -> None:
    """One overlay as a PNG, enlarged to at least ``min_side`` pixels so that small images stay visible."""
    from PIL import Image

    from core.atomic import atomic_path

    picture = Image.fromarray(overlay(image_uint8, heat))
    factor = max(1, -(-min_side // max(1, min(picture.size))))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.BICUBIC)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def choose_examples(labels: np.ndarray, probs: np.ndarray, per_class: int) -> dict[int, list[int]]:
    """Indices to show for each true class: misclassified ones (most confident first) and correct ones.

    Up to half the places go to mistakes, the rest to the most confident correct predictions; a class
    with too few of one kind gets more of the other.
    """
    pred = probs.argmax(1)
    confidence = probs.max(1)
    chosen: dict[int, list[int]] = {}
    for c in range(probs.shape[1]):
        members = np.flatnonzero(labels == c)
        wrong = members[pred[members] != c]
        right = members[pred[members] == c]
        wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
        right = right[np.argsort(-confidence[right], kind="stable")]
        n_wrong = min(len(wrong), max(per_class // 2, per_class - len(right)))
        n_right = min(len(right), per_class - n_wrong)
        chosen[c] = [int(i) for i in (*right[:n_right], *wrong[:n_wrong])]
    return chosen


def write_galleries(model: nn.Module, images_uint8: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                    image_ids: Sequence[str], class_names: Sequence[str], out_dir: str | os.PathLike,
                    device: str | torch.device = "cpu", per_class: int = 8) -> dict[str, str]:
    """For each class present, ``gradcam_<class>.png`` (a grid) and ``gradcam/<class>/<id>.png`` (each overlay).

    Galleries of an earlier run in ``out_dir`` are removed first, so none is left that this run did not
    choose. Returns {class name: gallery file name} for the classes that have examples.
    """
    import shutil
    from pathlib import Path

    out = Path(out_dir)
    shutil.rmtree(out / "gradcam", ignore_errors=True)
    for old in out.glob("gradcam_*.png"):
        old.unlink()
    chosen = choose_examples(labels, probs, per_class)
    order = [i for c in sorted(chosen) for i in chosen[c]]
    if not order:
        return {}
    pred = probs.argmax(1)
    maps = dict(zip(order, gradcam_maps(model, images_uint8[order], [int(pred[i]) for i in order], device)))
    galleries: dict[str, str] = {}
    for c, indices in chosen.items():
        if not indices:
            continue
        name = class_names[c]
        items = []
        for i in indices:
            item_id = str(image_ids[i])
            items.append(GalleryItem(image=_hwc(images_uint8[i]), overlay=overlay(images_uint8[i], maps[i]),
                                     image_id=item_id, true_name=name, pred_name=class_names[int(pred[i])],
                                     confidence=float(probs[i].max())))
            save_overlay(images_uint8[i], maps[i], out / "gradcam" / _safe(name) /
                         f"{_safe(item_id)}_pred-{_safe(class_names[int(pred[i])])}.png")
        galleries[name] = f"gradcam_{_safe(name)}.png"
        gradcam_gallery_figure(name, items, out / galleries[name])
    return galleries


def _hwc(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    return np.ascontiguousarray(image.transpose(1, 2, 0)) if image.shape[0] == 3 and image.ndim == 3 else image


def _safe(name: str) -> str:
    """A file-name-safe version of a class name or image id (ImageFolder ids hold slashes)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
