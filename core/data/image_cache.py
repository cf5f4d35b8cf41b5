"""Decode every image once, resized to S x S, into one uint8 array [N, 3, S, S] cached on disk.

The cache file is ``<cache_dir>/images/<fingerprint>-<S>px.npy``: keyed by the dataset's content
fingerprint (file list, sizes, mtimes, labels) and the size, so a changed dataset is decoded again
and an unchanged one is memory-mapped in about a second. Memory-mapping (copy-on-write) lets the
trials of a sweep on one machine share one copy in the page cache.

Images are decoded with PIL in a thread pool (PIL releases the GIL while decoding), turned upright
(EXIF orientation), converted to RGB and squashed, whole, to S x S with an antialiasing filter.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from core.io.atomic import atomic_path
from core.device import usable_cpus
from core.errors import UserError

logger = logging.getLogger(__name__)

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def decode_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode one image file to uint8 [3, S, S] RGB; a :class:`UserError` naming the file if unreadable."""
    try:
        with Image.open(path) as image:
            # JPEG only: decode straight at a reduced scale still >= S (much faster, same quality)
            image.draft("RGB", (image_size, image_size))
            image.load()  # the whole file, so a truncated image fails here
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: cannot read image ({' '.join(str(exc).split())})") from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:  # 16-bit or float grayscale: scale to 8 bits, not clip
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8))
    elif image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")  # palettes with transparency must pass through RGBA
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_all(paths: Sequence[Path], image_size: int, *, progress: bool = True,
               workers: int | None = None) -> np.ndarray:
    """Decode ``paths`` in a thread pool into one uint8 array [N, 3, S, S]."""
    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    if not paths:
        return out
    workers = workers or min(32, usable_cpus() + 2)
    from tqdm import tqdm

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    try:
        decoded = pool.map(lambda path: decode_image(path, image_size), paths, chunksize=1)
        bar = tqdm(decoded, total=len(paths), disable=not progress, unit="img", mininterval=0.5,
                   desc=f"decoding {len(paths)} images to {image_size}px")
        for index, pixels in enumerate(bar):
            out[index] = pixels
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out


def cache_file(cache_dir: str | os.PathLike, fingerprint: str, image_size: int) -> Path:
    return Path(cache_dir) / "images" / f"{fingerprint[:32]}-{image_size}px.npy"


def load_images(paths: Sequence[Path], image_size: int, fingerprint: str, cache_dir: str | os.PathLike,
                *, progress: bool = True) -> np.ndarray:
    """The decoded images of ``paths``, from the cache when it holds them, else decoded and cached."""
    path = cache_file(cache_dir, fingerprint, image_size)
    shape = (len(paths), 3, image_size, image_size)
    if path.is_file():
        # The cache is the one state file that heals itself: a damaged one is decoded and written again.
        try:
            cached = np.load(path, mmap_mode="c")
            if not isinstance(cached, np.ndarray):  # an .npz (zip) where an .npy belongs
                cached.close()
                raise ValueError(f"not an .npy array but {type(cached).__name__}")
            if cached.shape == shape and cached.dtype == np.uint8:
                logger.info("using %d cached %dpx images from %s", len(paths), image_size, path)
                return cached
            logger.warning("cache %s holds %s %s, expected %s: decoding again", path, cached.shape,
                           cached.dtype, shape)
        except (OSError, ValueError, EOFError) as exc:  # cut short, garbage, empty
            logger.warning("cache %s is damaged (%s): decoding again", path, " ".join(str(exc).split()))
    logger.info("decoding %d images to %dpx (once; cached in %s)", len(paths), image_size, path.parent)
    images = decode_all(paths, image_size, progress=progress)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, images)
    except (OSError, UserError) as exc:  # a read-only or full cache folder costs speed, not the run
        logger.warning("could not write the image cache %s (%s); next run decodes again", path, exc)
    return images
