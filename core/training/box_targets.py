"""The box head's targets and loss: the box around each lesion mask, after the image's augmentation.

    python -m core.train --data PATH --out DIR --set box_loss_weight=1

A training step (core/training/loop.py) moves each batch's lesion masks with their images: the mask rides as a fourth
channel through the very resampling of the flips, quarter turns, rotation, random resized crop and translation
(core/training/augment.py ``augment_batch``; where the translation reflects the image at a border, the lesion's mirror
image is lesion too), and through mixup and CutMix exactly as the pixels are mixed. The target is then
torchvision's ``masks_to_boxes`` of the moved mask, lesion where it is above a half:

- **mixup**: the mixed mask is ``lam`` times the image's own plus ``1 - lam`` times its partner's, so above a
  half it is the mask of the image that weighs more: the target is that image's lesion box;
- **CutMix**: the pasted rectangle carries the partner's mask with its pixels, so the target is the box around
  what is lesion in the mixed image (the image's own lesion outside the rectangle, the partner's inside).

An image without a mask (``has_mask`` False), a mixed image whose partner has none, or one whose lesion was
cropped out of view adds no box loss. The loss is the mean over the rest of the L1 distance of the corners
(fractions of the sides) plus torchvision's ``generalized_box_iou_loss`` (Rezatofighi et al. 2019); a batch
without any such image adds zero.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import generalized_box_iou_loss

from core.training.augment import Mix, apply_mix
from core.data.lesion_boxes import mask_boxes


def mix_with_masks(x: torch.Tensor, masks: torch.Tensor, mix: Mix,
                   rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, Mix]:
    """core.training.augment's ``apply_mix`` of a batch [B,3,S,S] with its moved masks [B,S,S] as a fourth channel, so that
    the masks are mixed exactly as the pixels; returns the images, the masks and the mix."""
    mixed, mix = apply_mix(torch.cat([x, masks[:, None]], 1), mix, rng)
    return mixed[:, :3], mixed[:, 3], mix


def batch_box_loss(predicted: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor,
                   mix: Mix | None) -> torch.Tensor:
    """The box loss against the moved (and mixed) masks' boxes; an image without a mask (or whose mix partner has
    none, or whose lesion left the view) adds none."""
    target, nonempty = mask_boxes(masks)
    valid = has_mask & nonempty if mix is None else has_mask & has_mask[mix.perm] & nonempty
    return box_loss(predicted, target, valid)


def box_loss(predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the ``valid`` rows of L1 (summed over the 4 coordinates) plus the GIoU loss; 0 without any."""
    weight = valid.float()
    l1 = (predicted.float() - target).abs().sum(1)
    # where not valid the target is replaced by the prediction itself: finite, and weighted out below
    safe = torch.where(valid[:, None], target, predicted.detach().float())
    giou = generalized_box_iou_loss(predicted.float(), safe, reduction="none")
    return ((l1 + giou) * weight).sum() / weight.sum().clamp_min(1.0)
