"""Images unlike the training data, made without downloading anything: what the out-of-distribution evaluation
(core/evaluation/trust.py) and ``python -m bench.ood_study`` score.

- ``natural_photos``: the pictures shipped with scikit-image (every PNG and JPEG in ``skimage.data.data_dir`` of the
  installed version: the cat, astronaut, coffee, rocket, coins, text, ...; those ``skimage.data`` would download are
  not used) and scikit-learn's two sample images (``load_sample_images``), each cut to the data's 4:3 shape
  (HAM10000's 600 x 450) at the centre and at four corners (70% of each side), then squashed to S x S with the
  bilinear resize of core/data/image_cache.py, as the data is.
- ``synthetic``: uniform and Gaussian noise, flat colours, linear gradients (seeded).
- ``shifted``: lesion images changed as a phone or a bad upload would: blurred, JPEG quality 10, a colour
  cast, rotated by 30 degrees (black corners). Reported apart: they are lesions, but not as trained on.
"""

from __future__ import annotations

import functools
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
CROP = 0.7                        # the corner crops keep this share of each side
SHIFTS = ("blur", "jpeg_q10", "colour_cast", "rotated")
SYNTHETIC_KINDS = ("uniform_noise", "gaussian_noise", "flat", "gradient")


def natural_photos(size: int) -> tuple[np.ndarray, list[str]]:
    """uint8 [N, 3, S, S] crops of the photos scikit-image and scikit-learn ship, and their names."""
    images, names = [], []
    for name, photo in _photos():
        for where, crop in _crops(photo):
            images.append(_squash(crop, size))
            names.append(f"{name}/{where}")
    return np.stack(images), names


@functools.lru_cache(maxsize=1)   # read once per process: every evaluation scores them (about 3 s to read)
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    """[H, W, 3] uint8 pictures: every PNG and JPEG in scikit-image's data folder, and scikit-learn's two."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    found = []
    for path in sorted(Path(skimage.data.data_dir).glob("*")):
        if path.suffix.lower() not in PICTURE_SUFFIXES:
            continue
        with Image.open(path) as picture:
            found.append((f"skimage.{path.stem}", _rgb(np.asarray(picture.convert("RGB")))))
    sample = load_sample_images()
    found += [(f"sklearn.{Path(path).stem}", _rgb(pixels)) for path, pixels in zip(sample.filenames, sample.images)]
    for _, pixels in found:
        pixels.flags.writeable = False   # shared by every caller
    return tuple(found)


def _rgb(pixels: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 of a grey, boolean, RGB or RGBA image."""
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3].astype(np.uint8))


def _crops(photo: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The photo's largest 4:3 centre cut, and four corner cuts of CROP of it."""
    h, w = photo.shape[:2]
    ch, cw = (h, h * 4 // 3) if w * 3 >= h * 4 else (w * 3 // 4, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    centre = photo[top:top + ch, left:left + cw]
    sh, sw = int(ch * CROP), int(cw * CROP)
    corners = {"top-left": (0, 0), "top-right": (0, cw - sw), "bottom-left": (ch - sh, 0),
               "bottom-right": (ch - sh, cw - sw)}
    return [("centre", centre)] + [(name, centre[y:y + sh, x:x + sw]) for name, (y, x) in corners.items()]


def _squash(pixels: np.ndarray, size: int) -> np.ndarray:
    """[3, S, S] of an [H, W, 3] image, resized as core/data/image_cache.py's decode_image does."""
    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def synthetic(size: int, per_kind: int = 8, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """uint8 [4 x per_kind, 3, S, S]: noise (uniform, Gaussian), flat colours and linear gradients."""
    rng = np.random.default_rng(seed)
    images, names = [], []
    ramp = np.linspace(0, 1, size)
    for i in range(per_kind):
        low, high = rng.integers(0, 256, (2, 3, 1, 1))
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
        t = (t - t.min()) / max(1e-9, np.ptp(t))
        made = {"uniform_noise": rng.integers(0, 256, (3, size, size)),
                "gaussian_noise": rng.normal(rng.uniform(60, 200), rng.uniform(20, 60), (3, size, size)),
                "flat": np.broadcast_to(rng.integers(0, 256, (3, 1, 1)), (3, size, size)),
                "gradient": low + (high - low) * t[None]}
        for kind in SYNTHETIC_KINDS:
            images.append(np.clip(made[kind], 0, 255).astype(np.uint8))
            names.append(f"{kind}/{i}")
    return np.stack(images), names


def shifted(pixels: np.ndarray, shift: str) -> np.ndarray:
    """uint8 [N, 3, S, S] lesion images with ``shift`` (one of SHIFTS) applied to each."""
    out = np.empty_like(pixels)
    for i, image in enumerate(pixels):
        picture = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
        out[i] = np.asarray(_shift(picture, shift), dtype=np.uint8).transpose(2, 0, 1)
    return out


def _shift(picture: Image.Image, shift: str) -> Image.Image:
    size = picture.width
    if shift == "blur":   # about 2 px at 64 px: a phone picture out of focus
        return picture.filter(ImageFilter.GaussianBlur(radius=size / 32))
    if shift == "jpeg_q10":
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=10)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")
    if shift == "colour_cast":   # warm light: red up, blue down
        values = np.asarray(picture, dtype=np.float32) * np.array([1.25, 1.0, 0.7], dtype=np.float32)
        return Image.fromarray(np.clip(values + np.array([20, 5, 0]), 0, 255).astype(np.uint8))
    if shift == "rotated":
        return picture.rotate(30, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    raise ValueError(f"unknown shift {shift!r} (expected one of {', '.join(SHIFTS)})")
