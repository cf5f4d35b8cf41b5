"""Tiny dataset folders for the data-layer tests, written into a test's tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from core.data.demo_data import generate_demo
from core.data.layouts import DEMO_MARKER, HAM_CLASSES, ISIC_COLUMNS

PALETTE = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (200, 40, 200), (40, 200, 200),
           (120, 120, 120), (250, 250, 250), (10, 10, 10), (160, 90, 30)]


def write_image(path: Path, color: Sequence[int] = (200, 40, 40), size: tuple[int, int] = (12, 10)) -> Path:
    """A one-colour RGB image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(color)).save(path)
    return path


def make_ham(root: Path, n_lesions: int = 40, image_size: int = 32, seed: int = 0) -> Path:
    """A small HAM10000-layout folder (the demo generator without its marker, so it reads as 'ham10000')."""
    generate_demo(root, n_lesions=n_lesions, image_size=image_size, seed=seed)
    (root / DEMO_MARKER).unlink()
    return root


def ham_labels(root: Path) -> dict[str, str]:
    """image_id -> dx, as the metadata says."""
    lines = (root / "HAM10000_metadata.csv").read_text().splitlines()[1:]
    return {line.split(",")[1]: line.split(",")[2] for line in lines}


def move_images(src: Iterable[Path], dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for folder in src:
        for file in folder.iterdir():
            shutil.move(str(file), dst / file.name)
        folder.rmdir()


def make_isic(root: Path, dx: Sequence[str], lesions: Sequence[str] | None = None,
              prefix: str = "ISIC2018_Task3_Training") -> Path:
    """An ISIC 2018 Task 3 folder: one-hot ground truth, ``_Input/`` images, optional lesion groupings."""
    inputs = root / f"{prefix}_Input"
    lines = ["image," + ",".join(ISIC_COLUMNS)]
    for i, code in enumerate(dx):
        image_id = f"ISIC_{i:07d}"
        lines.append(image_id + "," + ",".join("1.0" if c.lower() == code else "0.0" for c in ISIC_COLUMNS))
        write_image(inputs / f"{image_id}.jpg", PALETTE[HAM_CLASSES.index(code)])
    (inputs / "LICENSE.txt").write_text("CC-BY-NC\n")
    (root / f"{prefix}_GroundTruth.csv").write_text("\n".join(lines) + "\n")
    if lesions is not None:
        rows = [f"ISIC_{i:07d},{lesion},histopathology" for i, lesion in enumerate(lesions)]
        (root / f"{prefix}_LesionGroupings.csv").write_text(
            "image,lesion_id,diagnosis_confirm_type\n" + "\n".join(rows) + "\n")
    return root


def make_imagefolder(root: Path, classes: Sequence[str], per_class: int = 3,
                     splits: Sequence[str] = ("",)) -> Path:
    """Class folders of one-colour images, under each of ``splits`` ("" = directly under root)."""
    for split in splits:
        for index, name in enumerate(classes):
            for k in range(per_class):
                write_image(root / split / name / f"img{k}.png", PALETTE[index % len(PALETTE)])
    return root


def rng_image(path: Path, size: int = 24, seed: int = 0) -> Path:
    """A noisy RGB JPEG (compressible enough to be truncated meaningfully)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path
