"""How well heat maps point at the lesion, measured against lesion masks, beside two maps that know nothing.

For each image with a mask:

- **energy inside**: the share of the (non-negative) map's mass that lies inside the mask; a map
  that is zero everywhere counts as flat, i.e. it scores the mask's area share, as a uniform map does;
- **pointing hit**: the map's maximum lies inside the mask (where several pixels tie for the maximum,
  most of them must; a flat map points nowhere and misses).

For a set of maps: the means of both, and the **mean pairwise correlation** of the maps across images
(Pearson, over pixels), the position-bias alarm: maps that explain different images should differ,
so maps that look alike whatever the image show where the network looks by habit (an architectural
position bias), not the lesion. The masks' own mean correlation is given beside it: lesions of a
dataset photographed centred overlap, so a perfect explainer would still correlate that much.

Baselines on the same images: a **uniform** map (energy = the mask's area share; no maximum, no
correlation) and a **centred Gaussian** (sigma a quarter of the side), which knows only that
dermatoscopic images are taken with the lesion in the middle. Maps worth reading must beat the latter.

Used by core.evaluate, core.final_train and core.predict (via core.explain.gradcam) and bench/gradcam_study.py.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

BIAS_ALARM = 0.5          # mean pairwise map correlation above which the maps are called alike
CENTRED_SIGMA = 0.25      # of the image side
TIE = 1e-5                # relative tolerance of "equal to the maximum"


def energy_inside(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """float64 [N]: share of each map's non-negative mass inside its mask (flat zero maps: the area share)."""
    maps = np.clip(np.asarray(maps, dtype=np.float64), 0, None).reshape(len(maps), -1)
    masks = np.asarray(masks, dtype=bool).reshape(len(masks), -1)
    total = maps.sum(1)
    inside = (maps * masks).sum(1)
    area = masks.mean(1)
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), area)


def pointing_hits(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """bool [N]: most of the pixels at the map's maximum lie inside the mask; flat maps miss."""
    maps = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    masks = np.asarray(masks, dtype=bool).reshape(len(masks), -1)
    top = maps.max(1, keepdims=True)
    flat = top[:, 0] <= maps.min(1)
    at_top = maps >= top - TIE * np.abs(top)
    share = (at_top & masks).sum(1) / np.maximum(at_top.sum(1), 1)
    return (share > 0.5) & ~flat


def mean_pairwise_correlation(maps: np.ndarray) -> float:
    """Mean Pearson correlation over all pairs of maps (flat maps left out); NaN with fewer than two.

    Computed in O(N P), without the N x N matrix: with z_i the standardised maps (mean 0, variance 1
    over P pixels), sum over i != j of z_i . z_j / P = (|sum z_i|^2 - N P) / P.
    """
    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    std = flat.std(1)
    flat = flat[std > 1e-12 * np.maximum(np.abs(flat).max(1), 1e-30)]
    n, p = flat.shape
    if n < 2:
        return math.nan
    z = (flat - flat.mean(1, keepdims=True)) / flat.std(1, keepdims=True)
    total = z.sum(0)
    return float((total @ total - n * p) / (p * n * (n - 1)))


def centred_gaussian(size: int | tuple[int, int], sigma: float = CENTRED_SIGMA) -> np.ndarray:
    """float32 [H, W]: a Gaussian at the image centre, sigma = ``sigma`` times the side (1 at the very centre)."""
    h, w = (size, size) if isinstance(size, int) else size
    y = (np.arange(h) + 0.5 - h / 2) / (sigma * h)
    x = (np.arange(w) + 0.5 - w / 2) / (sigma * w)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)


def summarize(maps: np.ndarray, masks: np.ndarray) -> dict[str, float | int | None]:
    """Mean energy inside, pointing rate and mean pairwise correlation of a set of maps."""
    n = len(maps)
    if n == 0:
        return {"n_images": 0, "energy_inside": None, "pointing": None, "map_correlation": None}
    return {"n_images": int(n), "energy_inside": float(energy_inside(maps, masks).mean()),
            "pointing": float(pointing_hits(maps, masks).mean()),
            "map_correlation": _none_if_nan(mean_pairwise_correlation(maps))}


def baselines(masks: np.ndarray) -> dict[str, dict[str, float | int | None]]:
    """The uniform and centred-Gaussian maps' scores on these masks, and the masks' own correlation."""
    masks = np.asarray(masks, dtype=bool)
    n = len(masks)
    area = masks.reshape(n, -1).mean(1) if n else np.zeros(0)
    gauss = np.broadcast_to(centred_gaussian(masks.shape[-2:]), masks.shape) if n else masks
    return {
        "uniform": {"n_images": int(n), "energy_inside": float(area.mean()) if n else None, "pointing": None,
                    "map_correlation": None},
        "centred_gaussian": {"n_images": int(n),
                             "energy_inside": float(energy_inside(gauss, masks).mean()) if n else None,
                             "pointing": float(pointing_hits(gauss, masks).mean()) if n else None,
                             "map_correlation": 1.0 if n > 1 else None},
        "masks": {"n_images": int(n), "map_correlation": _none_if_nan(mean_pairwise_correlation(masks)) if n else None},
    }


def score_maps(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
               method: str) -> dict[str, Any]:
    """The ``gradcam`` section of metrics.json: overall and per true class, with both baselines.

    ``maps`` [N, H, W] and ``masks`` [N, H, W] for the N images that have a mask; ``labels`` index
    ``class_names``. ``method`` names how the maps were made (e.g. "LayerGradCam on layer2").
    """
    labels = np.asarray(labels)

    def block(rows: np.ndarray) -> dict[str, Any]:
        return {"gradcam": summarize(maps[rows], masks[rows]), **baselines(masks[rows])}

    overall = block(np.arange(len(maps)))
    per_class = {name: block(np.flatnonzero(labels == c)) for c, name in enumerate(class_names)
                 if np.any(labels == c)}
    return {"method": method, "n_images": int(len(maps)), "overall": overall, "per_class": per_class,
            "beats_centred": beats_centred(overall),
            "bias_alarm": bias_alarm(overall["gradcam"]["map_correlation"], overall["masks"]["map_correlation"])}


def beats_centred(block: Mapping[str, Any]) -> bool | None:
    """Energy inside above the centred Gaussian's on the same images (None when there is nothing to compare)."""
    ours, centred = block["gradcam"]["energy_inside"], block["centred_gaussian"]["energy_inside"]
    return None if ours is None or centred is None else bool(ours > centred)


def bias_alarm(correlation: float | None, masks_correlation: float | None = None) -> bool:
    """Maps more alike than BIAS_ALARM, and more alike than the lesions themselves (when their masks are known)."""
    return correlation is not None and correlation > max(BIAS_ALARM, masks_correlation or 0.0)


def verdict(scores: Mapping[str, Any]) -> str:
    """A plain sentence: do the maps beat the centred baseline, and how do they compare on pointing."""
    overall = scores["overall"]
    ours, centred, uniform = overall["gradcam"], overall["centred_gaussian"], overall["uniform"]
    if not ours["n_images"]:
        return "No evaluated image has a lesion mask, so the heat maps could not be scored."
    better = "beat" if scores["beats_centred"] else "do not beat"
    return (f"On the {ours['n_images']} images with a lesion mask the heat maps **{better}** a centred Gaussian "
            f"that knows nothing of the image: {_pct(ours['energy_inside'])} of their energy lies inside the lesion "
            f"against {_pct(centred['energy_inside'])} for the centred Gaussian ({_pct(uniform['energy_inside'])} "
            f"for a uniform map, the lesions' area share), and their maximum falls inside the lesion in "
            f"{_pct(ours['pointing'])} of the images against {_pct(centred['pointing'])}.")


def bias_note(correlation: float | None, masks_correlation: float | None = None) -> str | None:
    """The position-bias alarm in words, or None when the maps differ enough from image to image."""
    if not bias_alarm(correlation, masks_correlation):
        return None
    masks = (f"; the lesion masks themselves correlate at {masks_correlation:.2f}"
             if masks_correlation is not None else "")
    return (f"**Position-bias alarm:** the heat maps are alike from image to image (mean pairwise correlation "
            f"{correlation:.2f}, alarm above {BIAS_ALARM}{masks}). They show where this network looks by habit, "
            f"whatever the image, more than where the evidence for this image is: do not read them as "
            f"explanations of single predictions.")


def table(scores: Mapping[str, Any]) -> list[str]:
    """Markdown rows: overall and per class, the maps beside the centred and uniform baselines."""
    lines = ["| images | n | energy inside: maps | centred | uniform | pointing: maps | centred "
             "| map correlation | masks' correlation |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [("all", scores["overall"]), *scores["per_class"].items()]
    for name, block in rows:
        ours, centred, uniform = block["gradcam"], block["centred_gaussian"], block["uniform"]
        lines.append(f"| {name} | {ours['n_images']} | {_num(ours['energy_inside'])} | "
                     f"{_num(centred['energy_inside'])} | {_num(uniform['energy_inside'])} | "
                     f"{_num(ours['pointing'])} | {_num(centred['pointing'])} | {_num(ours['map_correlation'])} "
                     f"| {_num(block['masks']['map_correlation'])} |")
    return lines


def _num(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def score_one_map(heat: np.ndarray, mask: np.ndarray | None) -> dict[str, float | bool]:
    """Energy inside the lesion and pointing hit of one map, when its image has a mask."""
    if mask is None:
        return {}
    return {"energy_inside": float(energy_inside(heat[None], mask[None])[0]),
            "pointing_hit": bool(pointing_hits(heat[None], mask[None])[0])}


def masks_summary_line(maps: np.ndarray, masks: Sequence[np.ndarray | None]) -> str:
    """Lines under the table: the maps scored against the masks, beside a centred Gaussian's scores."""
    rows = [i for i, mask in enumerate(masks) if mask is not None]
    if not rows:
        return "Grad-CAM: no image has a lesion mask, nothing scored"
    ours = summarize(maps[rows], np.stack([masks[i] for i in rows]))
    centred = baselines(np.stack([masks[i] for i in rows]))["centred_gaussian"]
    return (f"Grad-CAM against {len(rows)} lesion masks: energy inside {ours['energy_inside']:.3f} "
            f"(centred Gaussian {centred['energy_inside']:.3f}), pointing {ours['pointing']:.3f} "
            f"(centred Gaussian {centred['pointing']:.3f})")
