"""Every split concern: the train/val/test assignment, splits.csv, and predefined (ImageFolder) splits.

The assignment is seeded, stratified by class and grouped by lesion.

No lesion has images in two splits (an image without a lesion id is its own group), and each class is
divided on its own, so every split keeps the class mix of the whole. sklearn's StratifiedGroupKFold
only makes folds of equal size; here the fractions are free (say 70/15/15), so the assignment is a
short greedy pass instead:

1. every lesion gets one class, the most frequent label among its images (ties: the lower index);
2. per class, the lesions are shuffled with the seed; while the class has enough lesions, the first
   ones go one each to train, val and test (so a class with 3+ lesions appears in every split);
3. each further lesion goes to the split furthest below its target share of the class's images.

Same labels, groups and seed give the same assignment, whatever the row order.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from core.io.atomic import write_text
from core.config import TEST_FRACTION, VAL_FRACTION, TrainConfig, check_fractions
from core.errors import UserError

if TYPE_CHECKING:
    from core.data.layouts import Listing

SPLITS = ("train", "val", "test")
SPLITS_COLUMNS = ("image_id", "label", "group", "split")


@dataclass(frozen=True)
class SplitOptions:
    """How core.data.dataset.load_dataset splits a dataset: drawn with these shares and seed, or read from a file."""

    val_fraction: float = VAL_FRACTION    # share of the images in the validation split (core/config.py's rule)
    test_fraction: float = TEST_FRACTION  # share of the images in the test split
    seed: int = 0                 # seed of the assignment (same labels, groups and seed: same splits)
    # A splits.csv from an earlier run (see write_splits), reused exactly; its image ids must be the dataset's.
    # When given, the fractions and seed are not used (but the fractions are still checked).
    splits_file: str | Path | None = None

    @classmethod
    def of_config(cls, cfg: TrainConfig, splits_file: str | Path | None = None) -> "SplitOptions":
        """The split settings of a TrainConfig."""
        return cls(cfg.val_fraction, cfg.test_fraction, cfg.split_seed, splits_file)


def assign_splits(labels: np.ndarray, groups: np.ndarray, *, val_fraction: float, test_fraction: float,
                  seed: int) -> np.ndarray:
    """Split name ("train" | "val" | "test") per image; fractions are shares of the images."""
    check_fractions(val_fraction, test_fraction, allow_zero_val=True)
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=str)
    names, group_of = np.unique(groups, return_inverse=True)  # sorted: independent of row order
    sizes = np.bincount(group_of, minlength=len(names))
    n_classes = int(labels.max()) + 1 if labels.size else 0
    votes = np.zeros((len(names), n_classes), dtype=np.int64)
    np.add.at(votes, (group_of, labels), 1)
    group_class = votes.argmax(axis=1)

    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    wanted = [s for s in range(3) if fractions[s] > 0]  # splits that get one lesion first
    rng = np.random.default_rng(seed)
    group_split = np.zeros(len(names), dtype=np.int64)
    for cls in range(n_classes):
        members = rng.permutation(np.flatnonzero(group_class == cls))
        target = fractions * sizes[members].sum()
        filled = np.zeros(3)
        for position, group in enumerate(members):
            if position < len(wanted):
                split = wanted[position]
            else:
                split = int(np.argmax(np.where(fractions > 0, target - filled, -np.inf)))
            group_split[group] = split
            filled[split] += sizes[group]
    return np.array(SPLITS)[group_split[group_of]]


def split_listing(listing: "Listing", val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """The split of each image of ``listing``: assigned, or completed where the layout fixes some.

    ImageFolder datasets with ``train/``, ``val/`` and ``test/`` folders keep those splits as given; a
    missing ``val/`` or ``test/`` is drawn from the lesions of ``train/`` (fractions as shares of it).
    """
    if listing.split is None:
        split = assign_splits(listing.labels, listing.groups, val_fraction=val_fraction,
                              test_fraction=test_fraction, seed=seed)
    else:
        split = listing.split.astype("<U5")
        present = set(split)
        val = 0.0 if "val" in present else val_fraction
        test = 0.0 if "test" in present else test_fraction
        train = split == "train"
        if val or test:
            split[train] = assign_splits(listing.labels[train], listing.groups[train], val_fraction=val,
                                         test_fraction=test, seed=seed)
    for name, fraction in (("train", 1.0), ("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and not np.any(split == name):
            raise UserError(f"{listing.root}: too few lesions for a {name} split "
                            f"({len(np.unique(listing.groups))} lesions in all)")
    return split


class SplitTable(Protocol):
    """What write_splits reads of a core.data.dataset.Dataset (a Protocol: that module imports this one)."""

    @property
    def class_names(self) -> tuple[str, ...]: ...
    @property
    def labels(self) -> np.ndarray: ...
    @property
    def image_ids(self) -> np.ndarray: ...
    @property
    def groups(self) -> np.ndarray: ...
    @property
    def split(self) -> np.ndarray: ...


def write_splits(data: SplitTable, path: str | Path) -> None:
    """Write ``splits.csv`` (image_id,label,group,split; label as class name) of a Dataset, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SPLITS_COLUMNS)
    names = np.array(data.class_names)[data.labels]
    writer.writerows(zip(data.image_ids, names, data.groups, data.split))
    write_text(path, buffer.getvalue())


def read_splits(path: str | Path, listing: "Listing") -> np.ndarray:
    """The split of each of ``listing``'s images as recorded in a ``splits.csv``; it must match exactly."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise UserError(f"{path}: cannot read splits file ({exc.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a splits CSV ({exc})") from None
    header = [name.strip() for name in rows[0]] if rows else []
    missing = [name for name in ("image_id", "split") if name not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(header) or 'none'})")
    col = {name: header.index(name) for name in header}
    known = {image_id: i for i, image_id in enumerate(listing.image_ids)}
    split = np.full(len(known), "", dtype="<U5")
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{path} line {line}: {len(row)} fields, expected {len(header)}")
        image_id, name = row[col["image_id"]].strip(), row[col["split"]].strip()
        index = known.get(image_id)
        if index is None:
            raise UserError(f"{path} line {line}: image {image_id} is not in the dataset at {listing.root}")
        if name not in SPLITS:
            raise UserError(f"{path} line {line}: split '{name}' is not one of {', '.join(SPLITS)}")
        if split[index]:
            raise UserError(f"{path} line {line}: image {image_id} is listed twice")
        if "label" in col:
            label = listing.class_names[listing.labels[index]]
            if row[col["label"]].strip() != label:
                raise UserError(f"{path} line {line}: image {image_id} has label '{row[col['label']].strip()}' "
                                f"there but '{label}' in the dataset")
        split[index] = name
    absent = np.flatnonzero(split == "")
    if absent.size:
        raise UserError(f"{path}: dataset image {listing.image_ids[absent[0]]} is not in the splits file "
                        f"({absent.size} dataset images are not)")
    return split
