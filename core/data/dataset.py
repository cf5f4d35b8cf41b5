"""The data layer: any supported dataset folder -> decoded images, labels, lesion groups and splits.

    python -m core.data --data PATH --image-size 64      # what is there, per split and class
    python -m core.data                                   # the built-in synthetic demo dataset

``load_dataset`` is the one entry point. It detects the layout (core/data/layouts.py: HAM10000, ISIC 2018
Task 3, ImageFolder), assigns lesion-grouped, class-stratified train/val/test splits (core/data/splits.py)
or reuses an earlier ``splits.csv`` exactly, and decodes the images once into a cached uint8 array
(core/data/image_cache.py). Without a path it uses the synthetic demo dataset (core/data/demo_data.py),
generated once into the cache folder.

ImageFolder datasets with ``train/``, ``val/`` and ``test/`` folders keep those splits as given
(core/data/splits.py completes a missing one from ``train/``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.config import IMAGE_SIZES, TEST_FRACTION, VAL_FRACTION, TrainConfig, check_fractions, image_size_ok
from core.data.demo_data import GENERATOR, generate_demo
from core.errors import UserError
from core.data.image_cache import decode_image, load_images
from core.data.layouts import DEMO_MARKER, read_layout
from core.data.masks import find_masks, load_masks
from core.data.splits import SPLITS, SplitOptions, read_splits, split_listing, write_splits

__all__ = ["Dataset", "SplitOptions", "load_dataset", "load_for_config", "decode_image", "default_cache_dir",
           "dataset_fingerprint", "demo_root"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True, eq=False)
class Dataset:
    """Decoded images with their labels, lesion groups and split, ready for training."""

    images: np.ndarray             # uint8 [N, 3, S, S], C-contiguous, RGB, S = image_size
    labels: np.ndarray             # int64 [N], index into class_names
    class_names: tuple[str, ...]   # HAM10000/ISIC: dx codes, alphabetical; ImageFolder: folder names sorted
    image_ids: np.ndarray          # str [N] (HAM: image_id; ImageFolder: relative path without suffix)
    groups: np.ndarray             # str [N] lesion id (image id when none)
    split: np.ndarray              # str [N], each "train" | "val" | "test"
    root: str                      # resolved dataset path
    layout: str                    # "ham10000" | "isic2018" | "imagefolder" | "demo"
    fingerprint: str               # hex digest of the file list (sizes, mtimes) and the label table
    masks: np.ndarray | None = None      # uint8 [N, S, S] lesion masks (1 = lesion) or None (core/data/masks.py)
    has_mask: np.ndarray | None = None   # bool [N]: image i has a mask (its row of ``masks`` is zeros otherwise)
    metadata: Any = None           # pandas DataFrame of the label table's other columns, row i = image i, or None

    def indices(self, split: str) -> np.ndarray:
        """int64 indices of the images in ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return np.flatnonzero(self.split == split).astype(np.int64)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def class_counts(self, split: str | None = None) -> np.ndarray:
        """Images per class (int64 [C]) in ``split``, or in all splits."""
        labels = self.labels if split is None else self.labels[self.indices(split)]
        return np.bincount(labels, minlength=len(self.class_names)).astype(np.int64)

    def summary(self) -> str:
        """A table of images per split and class, with the lesion counts."""
        width = max(6, *(len(c) for c in self.class_names))
        lines = [f"{'split':<{width}} " + " ".join(f"{s:>7}" for s in SPLITS) + "    total"]
        per_split = np.stack([self.class_counts(s) for s in SPLITS])
        for index, name in enumerate(self.class_names):
            lines.append(f"{name:<{width}} " + " ".join(f"{n:>7}" for n in per_split[:, index])
                         + f" {per_split[:, index].sum():>8}")
        lines.append(f"{'images':<{width}} " + " ".join(f"{n:>7}" for n in per_split.sum(axis=1))
                     + f" {len(self.labels):>8}")
        lesions = [len(np.unique(self.groups[self.indices(s)])) for s in SPLITS]
        lines.append(f"{'lesions':<{width}} " + " ".join(f"{n:>7}" for n in lesions)
                     + f" {len(np.unique(self.groups)):>8}")
        return "\n".join(lines)


def default_cache_dir() -> Path:
    """``$LESION_SWEEP_CACHE`` or ``~/.cache/lesion-sweep``."""
    return Path(os.environ.get("LESION_SWEEP_CACHE") or Path.home() / ".cache" / "lesion-sweep").expanduser()


def demo_root(cache_dir: str | Path | None = None) -> Path:
    """The built-in demo dataset's folder, generated there on first use."""
    root = Path(cache_dir or default_cache_dir()).expanduser() / GENERATOR
    if not (root / DEMO_MARKER).is_file():
        logger.info("generating the synthetic demo dataset in %s (once)", root)
        generate_demo(root)
    return root


def load_dataset(path: str | Path | None, image_size: int, splits: SplitOptions = SplitOptions(), *,
                 cache_dir: str | Path | None = None, progress: bool = True, masks: bool = True) -> Dataset:
    """Read the dataset at ``path`` (None: the built-in demo), split it and decode it to ``image_size``.

    ``splits``: the split shares and seed, or a ``splits.csv`` from an earlier run to reuse exactly (see
    :class:`~core.data.splits.SplitOptions`). ``masks``: also read the lesion masks, where the dataset has
    them (False for training, which needs none). Bad input raises :class:`UserError` naming the file or row.
    """
    if not image_size_ok(image_size):
        raise UserError("image size must be an integer in [%d, %d], got %r" % (*IMAGE_SIZES, image_size))
    check_fractions(splits.val_fraction, splits.test_fraction)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if path is None:
        path = demo_root(cache_dir)
        logger.info("no --data given: using the built-in synthetic demo dataset at %s", path)
    listing = read_layout(path)
    fingerprint = listing.fingerprint()
    if splits.splits_file is not None:
        split = read_splits(splits.splits_file, listing)
    else:
        split = split_listing(listing, splits.val_fraction, splits.test_fraction, splits.seed)
    images = load_images(listing.paths, image_size, fingerprint, cache_dir, progress=progress)
    lesions = None
    if masks:
        mask_paths = find_masks(listing.layout, listing.root, listing.paths, listing.image_ids)
        lesions = load_masks(mask_paths, listing.paths, image_size, fingerprint, cache_dir)
    data = Dataset(images=np.asarray(images), labels=listing.labels, class_names=listing.class_names,
                   image_ids=listing.image_ids, groups=listing.groups, split=split, root=str(listing.root),
                   layout=listing.layout, fingerprint=fingerprint, metadata=listing.metadata,
                   masks=None if lesions is None else np.asarray(lesions[0]),
                   has_mask=None if lesions is None else lesions[1])
    sizes = " / ".join(f"{s} {len(data.indices(s))}" for s in SPLITS)
    logger.info("%s dataset at %s: %d images, %d classes; %s images", data.layout, data.root,
                len(data.labels), len(data.class_names), sizes)
    return data


def load_for_config(path: str | Path | None, cfg: TrainConfig, splits_file: str | Path | None = None,
                    **kw: Any) -> Dataset:
    """:func:`load_dataset` with the image size and split settings of a TrainConfig."""
    return load_dataset(path, cfg.image_size, SplitOptions.of_config(cfg, splits_file), **kw)


def dataset_fingerprint(path: str | Path | None, cache_dir: str | Path | None = None) -> str:
    """The digest :attr:`Dataset.fingerprint` would have, without decoding any image."""
    return read_layout(demo_root(cache_dir) if path is None else path).fingerprint()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="dataset folder or CSV (default: the built-in synthetic demo)")
    parser.add_argument("--image-size", type=int, default=64, help="decode images to this square size")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    parser.add_argument("--test-fraction", type=float, default=TEST_FRACTION)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--splits-file", help="reuse the split assignment of this splits.csv")
    parser.add_argument("--write-splits", metavar="CSV", help="write the split assignment here")
    parser.add_argument("--cache-dir", help="cache folder (default: $LESION_SWEEP_CACHE or ~/.cache/lesion-sweep)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    splits = SplitOptions(args.val_fraction, args.test_fraction, args.split_seed, args.splits_file)
    data = load_dataset(args.data, args.image_size, splits, cache_dir=args.cache_dir)
    seconds = time.perf_counter() - start
    shared = _lesions_in_several_splits(data)
    print(f"{data.layout} dataset at {data.root}")
    print(f"{len(data.labels)} images at {data.image_size}px loaded in {seconds:.1f} s; "
          f"fingerprint {data.fingerprint[:16]}")
    print(data.summary())
    print(f"lesions in more than one split: {shared}")
    masked = 0 if data.has_mask is None else int(data.has_mask.sum())
    print(f"lesion masks: {masked} of {len(data.labels)} images" + ("" if masked else " (none found)"))
    if args.write_splits:
        write_splits(data, args.write_splits)
        print(f"wrote {args.write_splits}")
    return 0


def _lesions_in_several_splits(data: Dataset) -> int:
    pairs = {(g, s) for g, s in zip(data.groups, data.split)}
    return len(pairs) - len({g for g, _ in pairs})
