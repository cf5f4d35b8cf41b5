"""Augmentation of whole uint8 batches on the training device, with parameters drawn per sample.

torchvision.transforms.v2 draws one set of random parameters per call, so applied to a batch every
image gets the same crop. Here each sample gets its own: flips, 90-degree turns, the extra rotation,
the random resized crop and the translation are folded into one affine matrix per sample and applied by a single
``grid_sample``; colour jitter and the ImageNet normalisation are folded into one 3x3 colour matrix
and offset per sample, applied by a single batched matrix product. Everything runs where the batch is
(the GPU in a real run), so no DataLoader workers are needed, and nothing in it waits for the GPU.

Mixup and CutMix (``mixup_prob``/``cutmix_prob``, each with its Beta ``alpha``) mix a whole augmented batch
with a shuffled copy of itself, one weight per batch drawn on the host (:func:`draw_mix`, :func:`apply_mix`);
the loss is then against the mixed labels (:func:`mixed_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from core.config import TrainConfig
from core.model.forward import IMAGENET_MEAN, IMAGENET_STD, constant, standardization

def augment_batch(x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment uint8 images [B,3,S,S] with per-sample parameters; returns normalised float32.

    ``generator`` must live on ``x``'s device, so no random numbers cross between host and device.
    """
    b = x.shape[0]
    x = x.float()  # [0, 255]: every step below is linear in it until the colour clamp
    theta = _affine_params(b, cfg, generator, x.device)
    if theta is not None:
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if cfg.color_jitter > 0:
        return _color_jitter(x, cfg.color_jitter, generator)
    scale, shift = standardization(x.device)
    return torch.addcmul(shift, x, scale)


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device).mul_(high - low).add_(low)


def _affine_params(b: int, cfg: TrainConfig, g: torch.Generator, device: torch.device) -> torch.Tensor | None:
    """Per-sample 2x3 matrices mapping output to input coordinates, or None when all is off."""
    geometric = (cfg.hflip or cfg.vflip or cfg.rot90 or cfg.rotation_degrees > 0 or cfg.crop_scale_min < 1
                 or cfg.translate > 0)
    if not geometric:
        return None
    angle = torch.zeros(b, device=device)
    if cfg.rot90:
        angle += torch.randint(0, 4, (b,), generator=g, device=device).float() * (math.pi / 2)
    if cfg.rotation_degrees > 0:
        angle += _uniform(b, -cfg.rotation_degrees, cfg.rotation_degrees, g, device) * (math.pi / 180)
    flip_x = torch.ones(b, device=device)
    flip_y = torch.ones(b, device=device)
    if cfg.hflip:
        flip_x = torch.where(torch.rand(b, generator=g, device=device) < 0.5, -1.0, 1.0)
    if cfg.vflip:
        flip_y = torch.where(torch.rand(b, generator=g, device=device) < 0.5, -1.0, 1.0)
    # Random resized crop as torchvision's: area fraction in [scale_min, 1], aspect ratio in [3/4, 4/3].
    if cfg.crop_scale_min < 1:
        area = _uniform(b, cfg.crop_scale_min, 1.0, g, device)
        log_ratio = _uniform(b, math.log(3 / 4), math.log(4 / 3), g, device)
        ratio = torch.exp(log_ratio)
        width = torch.sqrt(area * ratio).clamp(max=1.0)
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        shift_x = _uniform(b, -1.0, 1.0, g, device) * (1 - width)
        shift_y = _uniform(b, -1.0, 1.0, g, device) * (1 - height)
    else:
        width = height = torch.ones(b, device=device)
        shift_x = shift_y = torch.zeros(b, device=device)
    if cfg.translate > 0:  # [-1, 1] spans the side: a fraction t of it is 2t; beyond the border, reflection
        shift_x = shift_x + _uniform(b, -2 * cfg.translate, 2 * cfg.translate, g, device)
        shift_y = shift_y + _uniform(b, -2 * cfg.translate, 2 * cfg.translate, g, device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # input = diag(width, height) @ rotation @ diag(flip_x, flip_y) @ output + shift
    theta = torch.stack([
        torch.stack([width * cos * flip_x, -width * sin * flip_y, shift_x], dim=1),
        torch.stack([height * sin * flip_x, height * cos * flip_y, shift_y], dim=1),
    ], dim=1)
    return theta


# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)).tolist()))


def _color_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation in [1-s, 1+s], hue shift in [-s/4, s/4] turns, per sample.

    ``x`` is [B,3,H,W] in [0, 255]; returns the jittered images clamped to [0, 1] and standardised.
    The four are applied, in that order, as one affine colour map per sample: brightness scales,
    contrast blends towards the image's mean grey, saturation towards each pixel's grey, hue rotates
    the YIQ chroma plane. Composed into one 3x3 matrix and offset, they cost one pass over the pixels
    (plus one for the mean) instead of a dozen.
    """
    b, device = x.shape[0], x.device

    def factor() -> torch.Tensor:
        return _uniform(b, max(0.0, 1 - strength), 1 + strength, g, device)

    brightness, contrast, saturation = factor(), factor(), factor()
    hue = _uniform(b, -strength / 4, strength / 4, g, device) * (2 * math.pi)

    gray = constant(_RGB_TO_YIQ[0], device)                                    # [3], sums to 1
    eye = torch.eye(3, device=device)
    # saturation: x -> s x + (1 - s) (gray . x) [1, 1, 1]
    desaturate = torch.ones(3, 1, device=device) * gray.view(1, 3)              # [3,3], rows = gray
    sat = saturation.view(b, 1, 1) * eye + (1 - saturation).view(b, 1, 1) * desaturate
    cos, sin = torch.cos(hue), torch.sin(hue)
    zero, one = torch.zeros_like(hue), torch.ones_like(hue)
    rotation = torch.stack([torch.stack([one, zero, zero], 1),
                            torch.stack([zero, cos, -sin], 1),
                            torch.stack([zero, sin, cos], 1)], 1)              # [B,3,3]
    color = constant(_YIQ_TO_RGB, device) @ rotation @ constant(_RGB_TO_YIQ, device) @ sat  # [B,3,3]
    # contrast: x -> c x + (1 - c) m, m the mean grey of the brightened image (in [0, 1] units)
    mean_gray = brightness * (x.mean((2, 3)) @ gray) / 255                      # [B]
    offset = color @ ((1 - contrast) * mean_gray).view(b, 1, 1).expand(b, 3, 1)  # [B,3,1]
    matrix = color * (brightness * contrast / 255).view(b, 1, 1)               # of x in [0, 255]
    # Standardisation folded in: clamp(y, 0, 1) standardised = clamp(standardised y, lo, hi) per channel.
    std = constant(IMAGENET_STD, device).view(1, 3, 1)
    mean = constant(IMAGENET_MEAN, device).view(1, 3, 1)
    out = torch.baddbmm((offset - mean) / std, matrix / std, x.reshape(b, 3, -1))
    low, high = (-mean / std).view(1, 3, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1)
    return out.view_as(x).clamp_(low, high)


# --- mixup and CutMix: whole batches mixed with a shuffled copy of themselves ---------------------

@dataclass(frozen=True)
class Mix:
    """How a batch was mixed: image i with image ``perm[i]``, the first weighing ``lam`` (in labels too)."""

    kind: str                 # "mixup" | "cutmix"
    perm: torch.Tensor        # int64 [B] on the batch's device
    lam: float                # weight of each image's own label; CutMix: the share of its pixels kept


def mix_rng(cfg: TrainConfig, generator: torch.Generator) -> np.random.Generator | None:
    """A host generator for the per-batch mixing draws, seeded from ``generator`` once (one read per epoch).

    None when mixing is off, so that runs without it draw exactly the random numbers they drew before.
    The mixing weights are scalars per batch: drawn on the host they never wait for the device.
    """
    if cfg.mixup_prob <= 0 and cfg.cutmix_prob <= 0:
        return None
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()
    return np.random.default_rng(int(seed))


def draw_mix(rng: np.random.Generator, cfg: TrainConfig, x: torch.Tensor, generator: torch.Generator) -> Mix | None:
    """Mixup with probability ``mixup_prob``, else CutMix with probability ``cutmix_prob``, else nothing."""
    if rng.random() < cfg.mixup_prob:
        kind, lam = "mixup", float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
    elif rng.random() < cfg.cutmix_prob:
        kind, lam = "cutmix", float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
    else:
        return None
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    return Mix(kind, perm, lam)


def apply_mix(x: torch.Tensor, mix: Mix, rng: np.random.Generator) -> tuple[torch.Tensor, Mix]:
    """The mixed batch (normalised floats [B,3,S,S]) and the mix with CutMix's weight set to the box it cut.

    CutMix (Yun et al. 2019): a box of area fraction ``1 - lam``, centred uniformly and clipped at the
    borders, is pasted from the partner image; the labels are then weighted by the pixels actually kept.
    """
    if mix.kind == "mixup":
        return torch.lerp(x[mix.perm], x, mix.lam), mix
    side_y, side_x = x.shape[-2:]
    cut = math.sqrt(1.0 - mix.lam)
    h, w = int(round(side_y * cut)), int(round(side_x * cut))
    cy, cx = int(rng.integers(side_y)), int(rng.integers(side_x))
    y0, y1 = max(cy - h // 2, 0), min(cy + h - h // 2, side_y)
    x0, x1 = max(cx - w // 2, 0), min(cx + w - w // 2, side_x)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[mix.perm, :, y0:y1, x0:x1]
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (side_y * side_x)
    return out, Mix(mix.kind, mix.perm, kept)


def mix_targets(y: torch.Tensor, mix: Mix | None, num_classes: int) -> torch.Tensor:
    """Soft targets [B, C]: ``lam`` on each image's class plus ``1 - lam`` on its partner's (one-hot unmixed).

    Each row sums to 1 and, the partners being a permutation, each class keeps its mass over the batch.
    """
    onehot = F.one_hot(y, num_classes).float()
    return onehot if mix is None else mix.lam * onehot + (1 - mix.lam) * onehot[mix.perm]


def mixed_loss(criterion: torch.nn.Module, logits: torch.Tensor, y: torch.Tensor, mix: Mix | None) -> torch.Tensor:
    """The loss against the soft targets of :func:`mix_targets`: ``lam`` times the loss against each image's
    own labels plus ``1 - lam`` times that against its partner's.

    Cross-entropy is linear in the target, so without class weights this is exactly the cross-entropy
    against the soft targets (label smoothing included); with class weights each part is normalised as the
    unmixed loss is (by the summed weights of its labels), so mixed and unmixed batches weigh the same.
    """
    if mix is None:
        return criterion(logits, y)
    return mix.lam * criterion(logits, y) + (1 - mix.lam) * criterion(logits, y[mix.perm])
