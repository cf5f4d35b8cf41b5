"""Grad-CAM heat maps with Captum: where in an image the model found the evidence for a class.

Two methods (``--gradcam-method``):

- ``guided`` (the default): Captum's ``GuidedGradCam``, guided backpropagation (a pixel-level map)
  times the Grad-CAM of a residual stage, by default the last one (layer4); absolute values summed
  over the colours. Chosen on the HAM10000 copy's validation split, against dermatologists' lesion
  masks (bench/gradcam_study.py; README "Grad-CAM"): it was the one method tried whose maps both put
  more of their mass inside the lesion than a centred Gaussian and peaked inside it in 80% of images.
- ``gradcam``: Captum's ``LayerGradCam`` on one stage, with ReLU as in the paper, bilinearly
  upsampled. Only as fine as the stage's map, so the stage is chosen by the map it gives: the deepest
  with at least 7x7 full cells (layer4 from 224 px, layer3 from 112 px, layer2 below); the last stage
  alone gives 2x2 maps at 64 px, which show the network's position bias more than the lesion.

The layer follows the model's arch (core/model/networks.py ``gradcam_layers``): a ResNet's residual stages
(layer2..layer4, chosen as above); EfficientNet, MobileNetV3 and ConvNeXt their last feature stage (``features[-1]``);
RegNet its ``trunk_output``. A model with clinical fields (core/model/networks.py ``FusionNet``) is explained with
each image's own encoded clinical fields (``clinical=``, Captum's ``additional_forward_args``): the map is of the
image branch, but the class it explains and the weights Grad-CAM gives the channels are those of the model as it
predicted, age, sex and site included (left out: every field unknown, as ``LoadedModel.predict`` does).

``--gradcam-layer`` overrides the stage of either (a layer the arch lacks is an error naming those it has). Captum
registers its hooks for each ``attribute`` call and removes them when the call ends, so the model is left as it was.

Where lesion masks exist (core/data/masks.py), :func:`explain_evaluation` scores the map of every
evaluated image against its mask (core/explain/mask_scores.py) and the overlays draw the mask's outline.

Used by ``core.final_train``, ``core.evaluate`` (the galleries) and ``core.predict --gradcam DIR``.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from core.config import DEFAULT_ARCH
from core.model.forward import normalize
from core.explain.gallery import GalleryItem, gradcam_gallery_figure
from core.model.networks import GRADCAM_LAYERS, STAGE_STRIDES, arch_of, gradcam_layer, gradcam_layers, fusion_of

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.6
OUTLINE_COLOR = (255, 255, 255)   # the lesion mask's outline on overlays


METHODS = ("gradcam", "guided")
CAPTUM_NAMES = {"gradcam": "LayerGradCam", "guided": "GuidedGradCam"}
# Chosen on the HAM10000 copy's validation split (bench/gradcam_study.py, README "Grad-CAM"): of the methods
# tried, only Guided Grad-CAM on layer4 put more of its map inside the lesion than a centred Gaussian does AND
# peaked inside the lesion in at least 80% of the images.
DEFAULT_METHOD = "guided"
MIN_MAP_SIDE = 7   # plain Grad-CAM: the deepest stage whose map has at least this many cells a side
BATCH_SIZE = 64    # images per Captum call: bounds the memory of the hooks' saved activations


def choose_layer(image_size: int, method: str = DEFAULT_METHOD, arch: str = DEFAULT_ARCH) -> str:
    """The layer a method looks at by default in ``arch``, at ``image_size`` px.

    An arch other than a ResNet has one Grad-CAM layer, its last feature stage. For a ResNet:
    Plain Grad-CAM ("gradcam") is only as fine as the stage's map: the deepest stage with at least 7x7
    full cells, i.e. layer4 (stride 32) from 224 px, layer3 (stride 16) from 112 px, layer2 (stride 8)
    below. Guided Grad-CAM ("guided") takes its resolution from guided backpropagation, pixel by pixel,
    and only its class weighting from the stage: the last one, layer4, as in the Grad-CAM paper.
    """
    if not arch.startswith("resnet"):
        return gradcam_layers(arch)[-1]
    if method == "guided":
        return GRADCAM_LAYERS[-1]
    for name in reversed(GRADCAM_LAYERS):
        if image_size // STAGE_STRIDES[name] >= MIN_MAP_SIDE:
            return name
    return GRADCAM_LAYERS[0]


def stage_side(image_size: int, layer: str) -> int:
    """Side of a residual stage's map for square images of ``image_size`` px (each stride-2 step rounds up)."""
    side = image_size
    for _ in range(STAGE_STRIDES[layer].bit_length() - 1):
        side = -(-side // 2)
    return side


def gradcam_maps(model: nn.Module, images_uint8: np.ndarray | torch.Tensor, targets: Sequence[int],
                 device: str | torch.device = "cpu", layer: str | None = None, method: str = DEFAULT_METHOD,
                 clinical: np.ndarray | None = None) -> np.ndarray:
    """Heat maps [N, H, W] in [0, 1] (each scaled by its maximum) for class ``targets[i]`` of image ``i``.

    ``layer``: the stage to look at; None chooses by image size and the model's arch (:func:`choose_layer`).
    ``method``: "gradcam" (LayerGradCam, bilinearly upsampled) or "guided" (GuidedGradCam: guided
    backpropagation times the nearest-upsampled Grad-CAM, absolute values summed over the colours).
    ``clinical``: the images' encoded clinical fields [N, D] for a model with clinical fields (None: every field
    unknown); an image-only model ignores it.
    """
    from captum.attr import GuidedGradCam

    if hasattr(model, "parts"):  # an ensemble (core/model/ensemble.py EnsembleNet): its members' maps, averaged
        return ensemble_maps(model, images_uint8, targets, device, layer, method, clinical)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    device = torch.device(device)
    images = torch.as_tensor(np.asarray(images_uint8)) if not isinstance(images_uint8, torch.Tensor) else images_uint8
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    if fusion_of(model) is None:
        clinical = None
    elif clinical is not None and len(clinical) != len(images):
        raise ValueError(f"{len(images)} images but {len(clinical)} clinical-field rows")
    model = model.to(device).eval()
    stage = gradcam_layer(model, layer or choose_layer(int(images.shape[-1]), method, arch_of(model)))
    cam = LayerGradCam(model, stage) if method == "gradcam" else GuidedGradCam(model, stage)
    size = tuple(images.shape[-2:])
    out = np.zeros((len(images), *size), dtype=np.float32)
    with torch.enable_grad(), warnings.catch_warnings():  # callers may sit inside no_grad; these need gradients
        # GuidedBackprop says, each call, that it hooks the ReLUs for the call's duration: nothing to act on
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        for start in range(0, len(images), BATCH_SIZE):
            x = normalize(images[start:start + BATCH_SIZE].to(device)).requires_grad_()
            target = torch.as_tensor(list(targets[start:start + BATCH_SIZE]), dtype=torch.long, device=device)
            extra = None if clinical is None else \
                (torch.as_tensor(np.asarray(clinical[start:start + BATCH_SIZE]), dtype=torch.float32, device=device),)
            if method == "guided":
                heat = cam.attribute(x, target=target, additional_forward_args=extra).detach().abs().sum(1)
            else:
                attribution = cam.attribute(x, target=target, additional_forward_args=extra, relu_attributions=True)
                if start == 0 and attribution.shape[-2:] == (1, 1):
                    log.warning("at %d px the chosen stage's map is 1x1, so Grad-CAM cannot localise "
                                "anything (each heat map is flat); use images of 48 px or more", size[0])
                heat = LayerAttribution.interpolate(attribution, size, interpolate_mode="bilinear")[:, 0].detach()
            out[start:start + len(x)] = heat.float().cpu().numpy()
            model.zero_grad(set_to_none=True)
    peak = out.reshape(len(out), -1).max(1) if len(out) else np.zeros(0)
    scale = np.where(peak > 0, peak, 1.0).astype(np.float32)
    return out / scale[:, None, None]


def ensemble_maps(model: nn.Module, images_uint8: np.ndarray | torch.Tensor, targets: Sequence[int],
                  device: str | torch.device = "cpu", layer: str | None = None, method: str = DEFAULT_METHOD,
                  clinical: np.ndarray | None = None) -> np.ndarray:
    """An ensemble's maps: the weighted mean of its members' (each at its own image size and clinical columns,
    brought back to the images' size), scaled by its maximum as :func:`gradcam_maps`'s are. ``layer`` applies to
    the members whose arch has it; the others take their default."""
    from core.model.ensemble import resized

    size = tuple(np.shape(images_uint8)[-2:])
    total = np.zeros((len(images_uint8), *size), dtype=np.float32)
    for member, weight, side, cols in model.parts():
        own = layer if layer in gradcam_layers(arch_of(member)) else None
        heat = gradcam_maps(member, resized(images_uint8, side), targets, device, own, method,
                            None if clinical is None else np.asarray(clinical)[:, cols])
        if heat.shape[-2:] != size:
            heat = torch.nn.functional.interpolate(torch.as_tensor(heat)[:, None], size=size, mode="bilinear",
                                                   align_corners=False)[:, 0].numpy()
        total += weight * heat
    peak = total.reshape(len(total), -1).max(1) if len(total) else np.zeros(0)
    return total / np.where(peak > 0, peak, 1.0).astype(np.float32)[:, None, None]


def map_side(image_size: int) -> int:
    """Side of ResNet-18's last-block (layer4) map for square images of ``image_size`` px."""
    return stage_side(image_size, "layer4")


def describe_method(image_size: int, layer: str, method: str = DEFAULT_METHOD) -> str:
    """E.g. "Captum LayerGradCam on layer2 (an 8x8 map at 64 px)"."""
    side = stage_side(image_size, layer)
    return f"Captum {CAPTUM_NAMES[method]} on {layer} (a {side}x{side} map at {image_size} px)"


def coarse_map_note(image_size: int, layer: str = "layer4") -> str | None:
    """A warning for report.md where the Grad-CAM map is too coarse to say much (below 4x4)."""
    side = stage_side(image_size, layer)
    if side >= 4:
        return None
    return (f"At {image_size} px the {layer} map is {side}x{side}, so each Grad-CAM heat map is that grid, "
            f"smoothly upsampled: it can point at a part of the image at best, and maps this coarse often show "
            f"the network's position bias more than the lesion. Use an earlier stage (`--gradcam-layer`) or "
            f"train at a larger size for heat maps worth reading.")


def outline(mask: np.ndarray) -> np.ndarray:
    """bool [H, W]: the mask's pixels with a 4-neighbour outside it (the image border counts as outside)."""
    inside = np.pad(np.asarray(mask, dtype=bool), 1)
    core = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    return inside[1:-1, 1:-1] & ~core


def overlay(image_uint8: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA,
            mask: np.ndarray | None = None) -> np.ndarray:
    """The heat map (jet colours) blended over an image; image [3,H,W] or [H,W,3] uint8 -> [H,W,3] uint8.

    The blend is strongest where the map is hot (``alpha``) and light where it is cold (a third of it),
    so the lesion stays visible wherever the model did not look. With a lesion ``mask`` [H, W] its
    outline is drawn in white.
    """
    from matplotlib import colormaps

    image = _hwc(image_uint8).astype(np.float32)
    heat = np.clip(heat, 0.0, 1.0)
    colors = colormaps["jet"](heat)[..., :3] * 255.0
    weight = (alpha * (1 + 2 * heat) / 3)[..., None]
    blended = np.clip((1 - weight) * image + weight * colors, 0, 255).astype(np.uint8)
    if mask is not None:
        blended[outline(mask)] = OUTLINE_COLOR
    return blended


def save_overlay(image_uint8: np.ndarray, heat: np.ndarray, path: str | os.PathLike, min_side: int = 224,
                 mask: np.ndarray | None = None) -> None:
    """One overlay as a PNG, enlarged to at least ``min_side`` pixels so that small images stay visible.

    The lesion mask's outline (if given) is drawn after enlarging, so it stays a thin line.
    """
    from PIL import Image

    from core.io.atomic import atomic_path

    picture = Image.fromarray(overlay(image_uint8, heat))
    factor = max(1, -(-min_side // max(1, min(picture.size))))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.BICUBIC)
    if mask is not None:
        pixels = np.array(picture)
        big = np.kron(np.asarray(mask, dtype=np.uint8), np.ones((factor, factor), dtype=np.uint8))
        pixels[outline(big)] = OUTLINE_COLOR
        picture = Image.fromarray(pixels)
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


@dataclass(frozen=True)
class GradcamOptions:
    """What Grad-CAM an evaluation makes (``--gallery``, ``--gradcam-layer``, ``--gradcam-method``)."""

    per_class: int = 8                 # gallery examples per class; 0 turns Grad-CAM off (no galleries, no scores)
    layer: str | None = None           # None: choose_layer(image size, method)
    method: str = DEFAULT_METHOD       # one of METHODS


@dataclass(frozen=True)
class Explainable:
    """The evaluated images and what the model said of them: what Grad-CAM explains."""

    images_uint8: np.ndarray           # (N, 3, H, W)
    labels: np.ndarray                 # (N,) true classes
    probs: np.ndarray                  # (N, classes) the model's probabilities
    image_ids: Sequence[str]
    class_names: Sequence[str]
    masks: np.ndarray | None = None    # (N, H, W) lesion masks, where ``has_mask``; None: no masks
    has_mask: np.ndarray | None = None
    clinical: np.ndarray | None = None  # (N, D) the encoded clinical fields a model with clinical fields predicted with

    def clinical_of(self, indices: Sequence[int]) -> np.ndarray | None:
        return None if self.clinical is None else np.asarray(self.clinical)[list(indices)]

    @property
    def masked(self) -> np.ndarray:
        """Indices of the images with a lesion mask."""
        if self.masks is None or self.has_mask is None:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.has_mask)

    def mask(self, i: int) -> np.ndarray | None:
        """Image ``i``'s lesion mask; None where it has none."""
        if self.masks is None or self.has_mask is None or not self.has_mask[i]:
            return None
        return np.asarray(self.masks[i])


def write_galleries(model: nn.Module, ev: Explainable, out_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    options: GradcamOptions = GradcamOptions(),
                    maps: Mapping[int, np.ndarray] | None = None) -> dict[str, str]:
    """For each class present, ``gradcam_<class>.png`` (a grid) and ``gradcam/<class>/<id>.png`` (each overlay).

    Lesion masks, where ``ev`` has them, are outlined on the overlays; ``maps``: heat maps already made,
    by image index (the rest are made here). Galleries of an earlier run in ``out_dir`` are removed
    first, so none is left that this run did not choose. Returns {class name: gallery file name} for the
    classes that have examples.
    """
    import shutil
    from pathlib import Path

    out = Path(out_dir)
    shutil.rmtree(out / "gradcam", ignore_errors=True)
    for old in out.glob("gradcam_*.png"):
        old.unlink()
    chosen = choose_examples(ev.labels, ev.probs, options.per_class)
    order = [i for c in sorted(chosen) for i in chosen[c]]
    if not order:
        return {}
    pred = ev.probs.argmax(1)
    maps = dict(maps or {})
    missing = [i for i in order if i not in maps]
    if missing:
        maps.update(zip(missing, gradcam_maps(model, ev.images_uint8[missing], [int(pred[i]) for i in missing], device,
                                              layer=options.layer, method=options.method,
                                              clinical=ev.clinical_of(missing))))
    galleries: dict[str, str] = {}
    for c, indices in chosen.items():
        if not indices:
            continue
        name = ev.class_names[c]
        items = []
        for i in indices:
            item_id, pred_name = str(ev.image_ids[i]), ev.class_names[int(pred[i])]
            image, mask = ev.images_uint8[i], ev.mask(i)
            items.append(GalleryItem(image=_hwc(image), overlay=overlay(image, maps[i]), image_id=item_id,
                                     true_name=name, pred_name=pred_name, confidence=float(ev.probs[i].max()),
                                     mask=mask))
            save_overlay(image, maps[i], out / "gradcam" / _safe(name) / f"{_safe(item_id)}_pred-{_safe(pred_name)}.png",
                         mask=mask)
        galleries[name] = f"gradcam_{_safe(name)}.png"
        gradcam_gallery_figure(name, items, out / galleries[name])
    return galleries


@dataclass(frozen=True)
class Explained:
    """Grad-CAM of an evaluation: the galleries, the ``gradcam`` section of metrics.json, and its verdict."""

    galleries: dict[str, str]          # class name -> gallery file, relative to the output folder
    document: dict[str, Any] | None    # None when no Grad-CAM was made (no galleries asked for)
    notes: tuple[str, ...] = ()        # warnings for report.md (maps too coarse to say much)
    masked_maps: np.ndarray | None = None   # the maps of the images with a lesion mask (``ev.masked``'s order)


def explain_evaluation(model: nn.Module, ev: Explainable, out_dir: str | os.PathLike,
                       device: str | torch.device = "cpu", options: GradcamOptions = GradcamOptions()) -> Explained:
    """Galleries, and where lesion masks exist, the maps of every evaluated image with one, scored against it.

    Maps are of the predicted class, made by ``options.method`` on ``options.layer`` (None:
    :func:`choose_layer`). The position-bias alarm is the maps' mean pairwise correlation: over the
    images with a mask when there are any, else over the gallery's. ``options.per_class`` 0 turns
    Grad-CAM off (no galleries, no scores).
    """
    import dataclasses

    from core.explain import mask_scores

    if options.per_class <= 0:
        write_galleries(model, ev, out_dir, device, options)  # removes an earlier run's galleries
        return Explained({}, None)
    size, method = int(ev.images_uint8.shape[-1]), options.method
    chosen_by = "--gradcam-layer" if options.layer else "image size"
    layer = options.layer or choose_layer(size, method, arch_of(model))
    gradcam_layer(model.members[0] if hasattr(model, "parts") else model, layer)  # a layer the arch lacks fails
    # here, before any map is made (an ensemble: its first member's arch chose it)
    scored = ev.masked
    shown = [i for indices in choose_examples(ev.labels, ev.probs, options.per_class).values() for i in indices]
    needed = sorted(set(shown) | set(scored.tolist()))
    pred = ev.probs.argmax(1)
    log.info("%s on %s: %d images (%d with a lesion mask)", CAPTUM_NAMES[method], layer, len(needed), len(scored))
    made = gradcam_maps(model, ev.images_uint8[needed], pred[needed].tolist(), device, layer=layer, method=method,
                        clinical=ev.clinical_of(needed))
    maps = dict(zip(needed, made))
    galleries = write_galleries(model, ev, out_dir, device, dataclasses.replace(options, layer=layer), maps=maps)
    basis = scored if len(scored) else np.array(shown, dtype=np.int64)
    correlation = mask_scores.mean_pairwise_correlation(np.stack([maps[i] for i in basis])) if len(basis) > 1 \
        else float("nan")
    lesions = None
    if len(scored):
        lesions = mask_scores.score_maps(np.stack([maps[i] for i in scored]), np.asarray(ev.masks)[scored],
                                            ev.labels[scored], ev.class_names, describe_method(size, layer, method))
    masks_correlation = lesions["overall"]["masks"]["map_correlation"] if lesions else None
    document = {
        "method": CAPTUM_NAMES[method], "layer": layer, "layer_chosen_by": chosen_by,
        "map_side": stage_side(size, layer), "image_size": size, "target": "predicted class", "n_maps": len(needed),
        "map_correlation": None if np.isnan(correlation) else float(correlation),
        "correlation_over": "images with a lesion mask" if len(scored) else "gallery images",
        "bias_alarm": mask_scores.bias_alarm(None if np.isnan(correlation) else float(correlation),
                                                masks_correlation),
        "lesion_masks": lesions,
    }
    coarse = coarse_map_note(size, layer) if method == "gradcam" else None
    return Explained(galleries, document, (coarse,) if coarse else (),
                     np.stack([maps[i] for i in scored]) if len(scored) else None)


def _hwc(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    return np.ascontiguousarray(image.transpose(1, 2, 0)) if image.shape[0] == 3 and image.ndim == 3 else image


def _safe(name: str) -> str:
    """A file-name-safe version of a class name or image id (ImageFolder ids hold slashes)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
