"""Find out which dataset layout a path holds and read it into one label table (no pixels).

Layouts, detected from what is on disk, in this order:

- ``ham10000``: ``HAM10000_metadata.csv`` (or ``HAM10000_metadata``, or any CSV whose header has
  ``image_id`` and ``dx``) with images in ``HAM10000_images_part_1/`` + ``..._part_2/`` (also spelt
  ``part1``/``part2``, any case), else in ``HAM10000_images/`` or ``images/``, else beside the CSV.
  Classes: the seven dx codes in alphabetical order.
- ``isic2018``: an ISIC 2018 Task 3 ground-truth CSV (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``, one-hot)
  with its ``..._Input/`` folder (or ``images/``); an optional ``..._LesionGroupings.csv``
  (``image,lesion_id,...``) gives the lesion of each image. Columns are mapped by name to the same
  seven lower-case dx codes as HAM10000.
- ``imagefolder``: class folders, either directly under the root or under ``train/``, ``val/``
  (also ``valid/``, ``validation/``) and ``test/``, which then fix the split. Classes: the union of
  the class folder names, sorted. A ``masks/`` folder in the root holds lesion masks (core/data/masks.py),
  not a class.

A path to a CSV file selects that CSV (useful where a folder holds several). Rows are sorted by
image id, so the order of a metadata file does not matter.

    python -m core.data.dataset --data PATH        # prints what was found
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from core.errors import UserError

HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
HAM_METADATA_NAMES = ("HAM10000_metadata.csv", "HAM10000_metadata")
HAM_COLUMNS = ("lesion_id", "image_id", "dx")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
DEMO_MARKER = "lesion-sweep-demo.json"
MASKS_FOLDER = "masks"
_HAM_PART = re.compile(r"(?:ham10000_)?images_part_?(\d+)", re.IGNORECASE)
_SKIPPED_FOLDERS = frozenset({"__macosx"})
LOOKED_FOR = ("HAM10000_metadata.csv with HAM10000_images_part_1/ and _part_2/ (HAM10000); "
              "an ISIC 2018 Task 3 ground-truth CSV (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC) with its "
              "_Input/ folder (ISIC 2018); class folders of images, optionally under train/ val/ test/ "
              "(ImageFolder)")


@dataclass(frozen=True, eq=False)
class Listing:
    """A dataset's label table: one row per image, sorted by image id; no pixels yet."""

    root: Path
    layout: str                  # "ham10000" | "isic2018" | "imagefolder" | "demo"
    class_names: tuple[str, ...]
    paths: tuple[Path, ...]      # image files
    image_ids: np.ndarray        # str [N]
    labels: np.ndarray           # int64 [N], index into class_names
    groups: np.ndarray           # str [N] lesion id (image id when none)
    split: np.ndarray | None     # str [N] split fixed by the layout ("" = to assign), None when none is
    # The label table's other columns (HAM10000: dx_type, age, sex, localization; ISIC: those of its lesion
    # groupings or metadata CSV), as strings ("" = missing), one row per image in the rows' order; None when
    # the layout has none. For evaluating per subgroup; never used in training and not in the fingerprint.
    metadata: pd.DataFrame | None = None

    def fingerprint(self) -> str:
        """Digest of the file list (relative paths, sizes, mtimes) plus the label table."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.layout, list(self.class_names)]).encode())
        fixed = self.split if self.split is not None else np.full(len(self.paths), "")
        prefix = os.path.join(str(self.root), "")
        for path, image_id, label, group, split in zip(self.paths, self.image_ids, self.labels,
                                                      self.groups, fixed):
            name = str(path)  # plain strings: pathlib costs more than the stat calls here
            try:
                stat = os.stat(name)
            except OSError as exc:
                raise UserError(f"{path}: cannot read image file ({exc.strerror})") from None
            rel = (name[len(prefix):] if name.startswith(prefix) else name).replace(os.sep, "/")
            digest.update(f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}\t{image_id}\t{int(label)}\t"
                          f"{group}\t{split}\n".encode())
        return digest.hexdigest()


def read_layout(path: str | os.PathLike) -> Listing:
    """Detect the layout at ``path`` and read its label table; :class:`UserError` when there is none."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    path = path.resolve()
    if path.is_file():
        return _read_csv_layout(path, root=path.parent)
    ham = [path / name for name in HAM_METADATA_NAMES if (path / name).is_file()]
    if ham:
        return _read_ham(ham[0], root=path)
    csvs = _classify_csvs(path)
    if csvs["ham10000"]:
        return _read_ham(_only(csvs["ham10000"], path, "HAM10000 metadata CSVs"), root=path)
    if csvs["isic2018"]:
        return _read_isic(_only(csvs["isic2018"], path, "ISIC 2018 ground-truth CSVs"), root=path)
    listing = _read_imagefolder(path)
    if listing is None:
        raise UserError(f"{path}: no known dataset layout found; looked for {LOOKED_FOR}")
    return listing


# --- HAM10000 -----------------------------------------------------------------------------------

def _read_ham(csv_path: Path, root: Path) -> Listing:
    table = _read_table(csv_path, HAM_COLUMNS)
    ids = _column(table, "image_id", csv_path)
    dx = table["dx"].str.strip().str.lower().to_numpy()
    unknown = np.flatnonzero(~np.isin(dx, HAM_CLASSES))
    if unknown.size:
        row = int(unknown[0])
        raise UserError(f"{csv_path} line {row + 2} (image {ids[row]}): unknown dx label '{dx[row]}' "
                        f"(expected one of {', '.join(HAM_CLASSES)})")
    lesions = table["lesion_id"].str.strip().to_numpy()
    groups = np.where(lesions == "", ids, lesions)
    labels = np.searchsorted(HAM_CLASSES, dx)
    folders = _ham_image_folders(csv_path.parent)
    paths = _find_listed_images(ids, folders, csv_path)
    layout = "demo" if (csv_path.parent / DEMO_MARKER).is_file() else "ham10000"
    return _by_id(Listing(root, layout, HAM_CLASSES, paths, ids, labels, groups, None,
                          metadata=table.drop(columns=list(HAM_COLUMNS))))


def _ham_image_folders(base: Path) -> list[Path]:
    """The image folders of a HAM10000 copy: the numbered parts, else one folder, else ``base``."""
    subdirs = _subfolders(base)
    parts: dict[int, Path] = {}
    for folder in subdirs:  # sorted: where two spellings of a part exist, the first one is used
        match = _HAM_PART.fullmatch(folder.name)
        if match:
            parts.setdefault(int(match.group(1)), folder)
    if parts:
        return [parts[number] for number in sorted(parts)]
    by_name = {folder.name.lower(): folder for folder in reversed(subdirs)}
    for name in ("ham10000_images", "images"):
        if name in by_name:
            return [by_name[name]]
    return [base]


# --- ISIC 2018 Task 3 ---------------------------------------------------------------------------

def _read_isic(csv_path: Path, root: Path) -> Listing:
    table = _read_table(csv_path, ("image",) + ISIC_COLUMNS, case_insensitive=True)
    ids = _column(table, "image", csv_path)
    try:
        onehot = table[list(ISIC_COLUMNS)].astype(float).to_numpy()
    except ValueError as exc:
        raise UserError(f"{csv_path}: class columns must hold numbers 0 or 1 ({exc})") from None
    is_binary = np.all((onehot == 0) | (onehot == 1), axis=1)
    bad = np.flatnonzero(~is_binary | (onehot.sum(axis=1) != 1))
    if bad.size:
        row = int(bad[0])
        values = ",".join(f"{c}={v:g}" for c, v in zip(ISIC_COLUMNS, onehot[row]))
        raise UserError(f"{csv_path} line {row + 2} (image {ids[row]}): class columns are not exactly "
                        f"one-hot ({values})")
    dx = np.array([c.lower() for c in ISIC_COLUMNS])[onehot.argmax(axis=1)]
    labels = np.searchsorted(HAM_CLASSES, dx)
    groups, metadata = ids.copy(), None
    groupings = _isic_groupings_csv(csv_path, root)
    if groupings is not None:
        # The lesion groupings (or an ISIC metadata CSV: age_approx, sex, anatom_site_general ...), by image.
        by_image = _read_groupings(groupings).reindex(ids).fillna("")
        groups = np.where(by_image["lesion_id"] == "", ids, by_image["lesion_id"].to_numpy(dtype=str))
        metadata = by_image.drop(columns=["lesion_id"]).reset_index(drop=True)
    paths = _find_listed_images(ids, [_isic_image_folder(csv_path, root)], csv_path)
    return _by_id(Listing(root, "isic2018", HAM_CLASSES, paths, ids, labels, groups, None, metadata=metadata))


def _isic_bases(csv_path: Path, root: Path) -> list[Path]:
    """Where ISIC's files may lie: beside the CSV, in the root, or one up (each zip unpacks to a folder)."""
    return list(dict.fromkeys([csv_path.parent, root, csv_path.parent.parent]))


def _isic_image_folder(csv_path: Path, root: Path) -> Path:
    bases = _isic_bases(csv_path, root)
    stem = csv_path.stem.replace("_GroundTruth", "")
    candidates = [base / f"{stem}_Input" for base in bases] + [base / "images" for base in bases]
    return next((folder for folder in candidates if folder.is_dir()), csv_path.parent)


def _isic_groupings_csv(csv_path: Path, root: Path) -> Path | None:
    bases = _isic_bases(csv_path, root)
    name = csv_path.name.replace("_GroundTruth", "_LesionGroupings")
    named = [base / name for base in bases if name != csv_path.name and (base / name).is_file()]
    if named:
        return named[0]
    for base in bases:
        for candidate in sorted(base.glob("*.csv")):
            header = {name.lower() for name in _csv_header(candidate)}
            if {"image", "lesion_id"} <= header and not header & {c.lower() for c in ISIC_COLUMNS}:
                return candidate
    return None


def _read_groupings(csv_path: Path) -> pd.DataFrame:
    """The groupings table indexed by image id: lesion_id and any other columns (stripped strings)."""
    table = _read_table(csv_path, ("image", "lesion_id"), case_insensitive=True)
    table = table.apply(lambda column: column.str.strip())
    return table.drop_duplicates("image").set_index("image")


# --- ImageFolder --------------------------------------------------------------------------------

def _read_imagefolder(root: Path) -> Listing | None:
    # masks/ in the root mirrors the image tree with lesion masks (core/data/masks.py): neither a class nor a split
    subdirs = [d for d in _subfolders(root) if d.name.lower() != MASKS_FOLDER]
    split_dirs = [(SPLIT_FOLDERS[d.name.lower()], d) for d in subdirs if d.name.lower() in SPLIT_FOLDERS]
    if split_dirs:
        seen: dict[str, Path] = {}
        for split, folder in split_dirs:
            if split in seen:
                raise UserError(f"{root}: both {seen[split].name}/ and {folder.name}/ hold the {split} split")
            seen[split] = folder
        if "train" not in seen:
            raise UserError(f"{root}: split folders {', '.join(f.name + '/' for f in seen.values())} "
                            f"found but no train/")
        sources = split_dirs
    else:
        sources = [("", root)]
    found: list[tuple[str, str, Path]] = []  # (split, class, file)
    empty: list[Path] = []
    for split, base in sources:
        classes = subdirs if base == root else _subfolders(base)
        if split and not classes:
            raise UserError(f"{base}: split folder holds no class folders")
        for folder in classes:
            files = sorted(p for p in folder.rglob("*") if _is_image_file(p, folder))
            found += [(split, folder.name, file) for file in files]
            if not files:
                empty.append(folder)
    if not found and not split_dirs:
        return None  # folders, but no images in any: not an ImageFolder dataset
    if empty:
        raise UserError(f"{empty[0]}: empty class folder (no image files)")
    class_names = tuple(sorted({name for _, name, _ in found}))
    if len(class_names) < 2:
        raise UserError(f"{root}: only one class folder ({class_names[0]}/) found; an ImageFolder dataset "
                        f"needs at least two (or is a metadata CSV missing? looked for {LOOKED_FOR})")
    paths = [file for _, _, file in found]
    ids = np.array([_relative(file, root).rsplit(".", 1)[0] for file in paths])
    labels = np.searchsorted(class_names, [name for _, name, _ in found])
    split = np.array([s for s, _, _ in found]) if split_dirs else None
    return _by_id(Listing(root, "imagefolder", class_names, paths, ids, labels, ids, split))


# --- shared helpers -----------------------------------------------------------------------------

def _by_id(rows: Listing) -> Listing:
    """``rows`` (fields as any sequences, in the layout's row order) sorted by image id, with typed fields;
    the ids must be unique."""
    ids = np.asarray(rows.image_ids, dtype=str)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    paths, metadata = rows.paths, rows.metadata
    if dup.size:
        first, second = order[dup[0]], order[dup[0] + 1]
        raise UserError(f"{rows.root}: two images share the id {ids[dup[0]]}: {paths[first]} and {paths[second]}")
    return Listing(root=rows.root, layout=rows.layout, class_names=tuple(rows.class_names),
                   paths=tuple(paths[i] for i in order), image_ids=ids,
                   labels=np.asarray(rows.labels, dtype=np.int64)[order],
                   groups=np.asarray(rows.groups, dtype=str)[order],
                   split=None if rows.split is None else np.asarray(rows.split, dtype=str)[order],
                   metadata=None if metadata is None or metadata.columns.empty
                   else metadata.iloc[order].reset_index(drop=True))


def _read_csv_layout(csv_path: Path, root: Path) -> Listing:
    kind = _csv_kind(csv_path)
    if kind == "ham10000":
        return _read_ham(csv_path, root)
    if kind == "isic2018":
        return _read_isic(csv_path, root)
    raise UserError(f"{csv_path}: not a dataset CSV; expected a HAM10000 metadata header "
                    f"({','.join(HAM_COLUMNS)},...) or an ISIC 2018 Task 3 ground truth "
                    f"(image,{','.join(ISIC_COLUMNS)})")


def _csv_kind(csv_path: Path) -> str | None:
    header = {name.lower() for name in _csv_header(csv_path)}
    if {"image_id", "dx"} <= header:
        return "ham10000"
    if "image" in header and header & {c.lower() for c in ISIC_COLUMNS}:
        return "isic2018"  # missing class columns are reported when it is read
    return None


def _classify_csvs(root: Path) -> dict[str, list[Path]]:
    """Dataset CSVs in ``root`` and its direct subfolders, by kind (ISIC ships its CSV in a folder)."""
    found: dict[str, list[Path]] = {"ham10000": [], "isic2018": []}
    for folder in [root] + _subfolders(root):
        for candidate in sorted(folder.glob("*.csv")):
            kind = _csv_kind(candidate)
            if kind:
                found[kind].append(candidate)
    return found


def _only(candidates: list[Path], root: Path, what: str) -> Path:
    if len(candidates) > 1:
        names = ", ".join(str(c.relative_to(root)) for c in candidates)
        raise UserError(f"{root}: several {what} found ({names}); pass the one to use as the data path")
    return candidates[0]


def _csv_header(csv_path: Path) -> list[str]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            return [name.strip() for name in next(csv.reader(handle), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _read_table(csv_path: Path, required: Sequence[str], case_insensitive: bool = False) -> pd.DataFrame:
    """Read a CSV as strings; every column in ``required`` must be present (UserError naming them)."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            skipinitialspace=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{csv_path}: cannot read CSV ({' '.join(str(exc).split())})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if case_insensitive:
        wanted = {name.lower(): name for name in required}
        table.columns = [wanted.get(c.lower(), c) for c in table.columns]
    missing = [name for name in required if name not in table.columns]
    if missing:
        raise UserError(f"{csv_path}: missing column(s) {', '.join(missing)} "
                        f"(found: {', '.join(table.columns) or 'none'})")
    if table.empty:
        raise UserError(f"{csv_path}: no rows")
    return table


def _column(table: pd.DataFrame, name: str, csv_path: Path) -> np.ndarray:
    """A column of ids: non-empty and unique (UserError naming the line otherwise)."""
    values = table[name].str.strip().to_numpy().astype(str)
    empty = np.flatnonzero(values == "")
    if empty.size:
        raise UserError(f"{csv_path} line {int(empty[0]) + 2}: empty {name}")
    first_line: dict[str, int] = {}
    for row, value in enumerate(values):
        if value in first_line:
            raise UserError(f"{csv_path} line {row + 2}: duplicate {name} {value} "
                            f"(first at line {first_line[value]})")
        first_line[value] = row + 2
    return values


def _find_listed_images(ids: np.ndarray, folders: Sequence[Path], csv_path: Path) -> list[Path]:
    index: dict[str, Path] = {}
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not _has_image_name(entry.name) or not entry.is_file():
                    continue
                stem = entry.name.rsplit(".", 1)[0]
                if stem in index:
                    raise UserError(f"two image files for image {stem}: {index[stem]} and {entry.path}")
                index[stem] = Path(entry.path)
    missing = [(row, image_id) for row, image_id in enumerate(ids) if image_id not in index]
    if missing:
        row, image_id = missing[0]
        more = f" ({len(missing) - 1} more listed images are missing too)" if len(missing) > 1 else ""
        where = ", ".join(str(f) for f in folders)
        raise UserError(f"{csv_path} line {row + 2}: image {image_id} not found in {where}{more}")
    return [index[image_id] for image_id in ids]


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name.lower() not in _SKIPPED_FOLDERS)


def _has_image_name(name: str) -> bool:
    # dot files are skipped: macOS "._x.jpg" resource forks are not images
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _is_image_file(path: Path, base: Path) -> bool:
    rel = path.relative_to(base).parts
    return _has_image_name(path.name) and not any(p.startswith(".") or p.lower() in _SKIPPED_FOLDERS
                                                  for p in rel) and path.is_file()


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
