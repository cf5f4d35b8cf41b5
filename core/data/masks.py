"""Lesion masks beside a dataset: found per layout, decoded once to the training size, cached like the images.

    python -m core.data.dataset --data PATH --image-size 64      # says how many images have a mask

Where masks are looked for (an image without one simply gets no Grad-CAM score):

- HAM10000 and ISIC 2018: any folder beside the images (in the dataset root, or next to the image
  folder) holding ``<image_id>_segmentation.png`` files: HAM10000's lesion segmentations
  (``HAM10000_segmentations_lesion_tschandl/``) and ISIC 2018 Task 1's ground truth
  (``ISIC2018_Task1_Training_GroundTruth/``) are both spelt that way.
- ImageFolder: a ``masks/`` folder in the root mirroring the image tree, ``masks/<same path>.png``
  (or ``..._segmentation.png``); e.g. ``train/mel/a.jpg`` -> ``masks/train/mel/a.png``.

A mask is a binary image of its image's size (white, or any value above 127, is lesion). It is turned
upright and squashed to S x S exactly as its image is (core/data/image_cache.py: whole image, bilinear),
then binarised at half. A mask of another size than its image, or one that cannot be read, is a
:class:`UserError` naming the file. The decoded masks, uint8 [N, S, S] (1 = lesion), are cached in
``<cache_dir>/masks/<digest>-<S>px.npy``, keyed by the images' fingerprint and the mask files'
names, sizes and mtimes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from core.io.atomic import atomic_path
from core.errors import UserError
from core.data.layouts import MASKS_FOLDER

logger = logging.getLogger(__name__)

MASK_SUFFIX = "_segmentation"
MASK_EXTENSIONS = (".png",)


def find_masks(layout: str, root: Path, image_paths: Sequence[Path], image_ids: Sequence[str]) -> list[Path | None]:
    """The mask file of each image (None where it has none); all None when the dataset has no masks."""
    if layout == "imagefolder":
        return _mirrored_masks(Path(root), image_paths)
    index = _segmentation_index(_mask_bases(Path(root), image_paths), {Path(p).parent for p in image_paths})
    return [index.get(str(image_id)) for image_id in image_ids]


def _mask_bases(root: Path, image_paths: Sequence[Path]) -> list[Path]:
    """Folders whose subfolders may hold masks: the root and the parents of the image folders."""
    parents = {Path(p).parent.parent for p in image_paths if Path(p).parent != root}
    return list(dict.fromkeys([root, *sorted(parents)]))


def _segmentation_index(bases: Sequence[Path], image_folders: set[Path]) -> dict[str, Path]:
    """image id -> ``<id>_segmentation.png`` found in a direct subfolder of one of ``bases``."""
    index: dict[str, Path] = {}
    for base in bases:
        try:
            folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        for folder in folders:
            if folder in image_folders:
                continue
            with os.scandir(folder) as entries:
                for entry in entries:
                    stem, ext = os.path.splitext(entry.name)
                    if ext.lower() not in MASK_EXTENSIONS or not stem.endswith(MASK_SUFFIX) or entry.name[0] == ".":
                        continue
                    image_id = stem[:-len(MASK_SUFFIX)]
                    path = Path(entry.path)
                    if image_id in index and index[image_id] != path:
                        raise UserError(f"two mask files for image {image_id}: {index[image_id]} and {path}")
                    index[image_id] = path
    return index


def _mirrored_masks(root: Path, image_paths: Sequence[Path]) -> list[Path | None]:
    masks_root = root / MASKS_FOLDER
    if not masks_root.is_dir():
        return [None] * len(image_paths)
    found: list[Path | None] = []
    for path in image_paths:
        rel = Path(path).relative_to(root).with_suffix("")
        candidates = [masks_root / rel.parent / f"{rel.name}{tail}{ext}" for tail in ("", MASK_SUFFIX)
                      for ext in MASK_EXTENSIONS]
        found.append(next((c for c in candidates if c.is_file()), None))
    return found


def mask_beside(image_path: str | os.PathLike, masks_dir: str | os.PathLike) -> Path | None:
    """The mask of one image file in ``masks_dir``: ``<stem>_segmentation.png`` or ``<stem>.png`` (None if neither)."""
    stem = Path(image_path).stem
    candidates = [Path(masks_dir) / f"{stem}{tail}{ext}" for tail in (MASK_SUFFIX, "") for ext in MASK_EXTENSIONS]
    return next((c for c in candidates if c.is_file()), None)


def masks_fingerprint(mask_paths: Sequence[Path | None], images_fingerprint: str) -> str:
    """Digest of the images' fingerprint and each mask file's name, size and mtime."""
    digest = hashlib.sha256(images_fingerprint.encode())
    for path in mask_paths:
        if path is None:
            digest.update(b"-\n")
            continue
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise UserError(f"{path}: cannot read mask file ({exc.strerror})") from None
        digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def decode_mask(mask_path: str | os.PathLike, image_path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One mask -> uint8 [S, S] (1 = lesion), resized as its image is; UserError naming the file if bad."""
    try:
        with Image.open(image_path) as image:
            expected = ImageOps.exif_transpose(image).size if _turned(image) else image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{image_path}: cannot read image ({' '.join(str(exc).split())})") from None
    try:
        with Image.open(mask_path) as mask:
            mask.load()
            mask = ImageOps.exif_transpose(mask)
            if mask.size != expected:
                raise UserError(f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} but its image {image_path} "
                                f"is {expected[0]}x{expected[1]}")
            gray = mask.convert("L")
            resized = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
            pixels = np.asarray(resized, dtype=np.uint8)
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{mask_path}: cannot read mask ({' '.join(str(exc).split())})") from None
    return (pixels > 127).astype(np.uint8)


def _turned(image: Image.Image) -> bool:
    return image.getexif().get(0x0112, 1) not in (1, None)  # EXIF orientation other than upright


def load_masks(mask_paths: Sequence[Path | None], image_paths: Sequence[Path], image_size: int,
               images_fingerprint: str, cache_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """``(masks uint8 [N, S, S], present bool [N])``, from the cache or decoded once; None with no mask at all.

    Rows of images without a mask are zeros, and ``present`` is False there.
    """
    present = np.array([p is not None for p in mask_paths], dtype=bool)
    if not present.any():
        return None
    key = masks_fingerprint(mask_paths, images_fingerprint)
    path = Path(cache_dir) / "masks" / f"{key[:32]}-{image_size}px.npy"
    shape = (len(mask_paths), image_size, image_size)
    if path.is_file():
        try:
            cached = np.load(path, mmap_mode="c")
            if cached.shape == shape and cached.dtype == np.uint8:
                logger.info("using %d cached %dpx lesion masks from %s", int(present.sum()), image_size, path)
                return cached, present
        except (OSError, ValueError) as exc:
            logger.warning("mask cache %s is unreadable (%s): decoding again", path, exc)
    logger.info("decoding %d lesion masks to %dpx (once; cached in %s)", int(present.sum()), image_size, path.parent)
    masks = np.zeros(shape, dtype=np.uint8)
    rows = np.flatnonzero(present)
    pool = ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2), thread_name_prefix="masks")
    try:  # PIL releases the GIL while decoding; a bad mask stops the rest at once
        decoded = pool.map(lambda i: decode_mask(mask_paths[i], image_paths[i], image_size), rows)
        for i, mask in zip(rows, decoded):
            masks[i] = mask
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, masks)
    except OSError as exc:  # a read-only or full cache folder costs speed, not the run
        logger.warning("could not write the mask cache %s (%s); next run decodes again", path, exc)
    return masks, present


def read_masks(paths: Sequence[str], masks_dir: str, size: int) -> list[np.ndarray | None]:
    """Each image's lesion mask from ``masks_dir`` at ``size`` px, None where it has none."""
    if not Path(masks_dir).is_dir():
        raise UserError(f"{masks_dir}: no such folder of lesion masks")
    found = [mask_beside(path, masks_dir) for path in paths]
    if not any(found):
        logger.warning("no lesion mask for any image in %s (looked for <image name>_segmentation.png)", masks_dir)
    return [None if mask is None else decode_mask(mask, path, size) for path, mask in zip(paths, found)]
