"""A synthetic, HAM10000-shaped demo dataset: the default data, and the generator of test fixtures.

    python -m core.data.demo_data OUT_DIR [--lesions 730] [--image-size 64] [--seed 0]

Each lesion is a blob on a skin-coloured background; the seven classes differ in colour, size,
border irregularity, edge sharpness and texture (dots, vessels, a white centre, scales, stripes),
each drawn per lesion from overlapping distributions, so a model has something to learn but cannot
read the class off one pixel. Every lesion is imaged one to four times with small shifts, rotations,
zoom and lighting changes, fresh noise and, sometimes, hairs and a dark dermoscope rim. The class
mix follows HAM10000 (nv 67%, mel 11%, bkl 11%, bcc 5%, akiec 3%, vasc 1.4%, df 1.2%) with at least
six lesions a class where the lesion count allows.

The output is a HAM10000 layout (``HAM10000_metadata.csv``, ``HAM10000_images_part_1/`` and ``_part_2/``, and the
lesion masks in ``HAM10000_segmentations_lesion_tschandl/<image_id>_segmentation.png``: the drawn lesion's own
outline, so Grad-CAM can be scored on it) plus ``lesion-sweep-demo.json`` describing how it was made, written
atomically (built in a temporary folder, then renamed), so it goes through the same loader as the real data. Same
arguments, same files.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from core.errors import UserError, run_cli
from core.data.layouts import DEMO_MARKER, HAM_CLASSES

logger = logging.getLogger(__name__)

GENERATOR = "demo-ham10000-v2"   # v2: lesion masks
DEFAULT_LESIONS = 730     # about 1,500 images
DEFAULT_IMAGE_SIZE = 64
PREVALENCE = {"akiec": 0.03, "bcc": 0.05, "bkl": 0.11, "df": 0.012, "mel": 0.11, "nv": 0.67, "vasc": 0.014}
MASKS_FOLDER = "HAM10000_segmentations_lesion_tschandl"   # the name of HAM10000's lesion segmentation release
MIN_LESIONS_PER_CLASS = 6
IMAGES_PER_LESION = ((1, 0.35), (2, 0.35), (3, 0.2), (4, 0.1))
SITES = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "scalp")


@dataclass(frozen=True)
class _Style:
    """Class means of a lesion's look (colours are RGB in [0, 1]; lengths in half image widths)."""

    color: tuple[float, float, float]
    second: tuple[float, float, float]   # colour mixed in by variegation
    radius: float
    irregularity: float                  # amplitude of the border's harmonics
    edge: float                          # softness of the border, relative to the radius
    variegation: float                   # how much of ``second`` the colour field mixes in
    dots: float                          # mean number of dots/globules
    dot_color: tuple[float, float, float]
    vessels: float = 0.0                 # mean number of thin red vessels
    white_center: float = 0.0            # strength of a central white patch
    scales: float = 0.0                  # strength of white scaly flecks
    stripes: float = 0.0                 # strength of ridge-like stripes


STYLES = {
    "akiec": _Style((0.76, 0.45, 0.40), (0.86, 0.70, 0.66), 0.36, 0.10, 0.30, 0.3, 0.0, (0.6, 0.3, 0.3),
                    vessels=0.7, scales=0.55),
    "bcc": _Style((0.84, 0.55, 0.60), (0.93, 0.80, 0.82), 0.30, 0.06, 0.10, 0.35, 2.0, (0.36, 0.38, 0.48),
                  vessels=4.0),
    "bkl": _Style((0.60, 0.44, 0.31), (0.46, 0.34, 0.25), 0.40, 0.07, 0.08, 0.4, 0.5, (0.35, 0.25, 0.18),
                  stripes=0.35),
    "df": _Style((0.55, 0.37, 0.28), (0.48, 0.33, 0.25), 0.26, 0.03, 0.12, 0.2, 0.3, (0.4, 0.28, 0.2),
                 white_center=0.75),
    "mel": _Style((0.27, 0.18, 0.15), (0.40, 0.40, 0.50), 0.46, 0.12, 0.06, 0.45, 6.0, (0.10, 0.07, 0.07)),
    "nv": _Style((0.45, 0.30, 0.22), (0.37, 0.25, 0.18), 0.32, 0.04, 0.07, 0.15, 1.5, (0.30, 0.20, 0.15)),
    "vasc": _Style((0.62, 0.16, 0.25), (0.40, 0.08, 0.20), 0.26, 0.04, 0.05, 0.3, 5.0, (0.35, 0.04, 0.14)),
}
SKIN = np.array([0.86, 0.67, 0.57])


def class_counts(n_lesions: int) -> dict[str, int]:
    """Lesions per class: HAM10000's mix, at least ``min(6, n // 7)`` each, nv takes the rest."""
    if n_lesions < len(HAM_CLASSES):
        raise UserError(f"the demo dataset needs at least {len(HAM_CLASSES)} lesions, got {n_lesions}")
    floor = min(MIN_LESIONS_PER_CLASS, n_lesions // len(HAM_CLASSES))
    counts = {c: max(floor, round(PREVALENCE[c] * n_lesions)) for c in HAM_CLASSES if c != "nv"}
    counts["nv"] = n_lesions - sum(counts.values())
    return {c: counts[c] for c in HAM_CLASSES}


def generate_demo(root: str | os.PathLike, n_lesions: int = DEFAULT_LESIONS,
                  image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0, *, image_format: str = "jpg",
                  hair: bool = True) -> Path:
    """Write the demo dataset to ``root`` (which must not exist or be empty) and return its path."""
    root = Path(root).expanduser().resolve()
    if image_format not in ("jpg", "png"):
        raise UserError(f"demo image format must be 'jpg' or 'png', got '{image_format}'")
    if image_size < 16:
        raise UserError(f"demo image size must be at least 16 px, got {image_size}")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"{root}: exists and is not an empty folder; the demo dataset needs a new one")
    counts = class_counts(n_lesions)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    try:
        n_images = _write_demo(tmp, counts, image_size, seed, image_format, hair)
        info = {"generator": GENERATOR, "n_lesions": n_lesions, "n_images": n_images,
                "image_size": image_size, "seed": seed, "image_format": image_format, "hair": hair,
                "lesions_per_class": counts,
                "about": "synthetic lesion-like images from core/data/demo_data.py; not medical data"}
        (tmp / DEMO_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if root.is_dir():
            root.rmdir()  # empty, checked above
        os.rename(tmp, root)
    except OSError:
        if not (root / DEMO_MARKER).is_file():  # not merely beaten to it by another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_demo(out: Path, counts: dict[str, int], size: int, seed: int, image_format: str,
                hair: bool) -> int:
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    labels = np.random.default_rng([seed, 1]).permutation(labels)
    rows = []
    for lesion, dx in enumerate(labels):
        rng = np.random.default_rng([seed, 2, lesion])
        look = _sample_lesion(STYLES[dx], rng)
        n_images = rng.choice([n for n, _ in IMAGES_PER_LESION], p=[p for _, p in IMAGES_PER_LESION])
        age, sex, site = 5 * int(rng.integers(4, 17)), rng.choice(["male", "female"]), rng.choice(SITES)
        for _ in range(n_images):
            rows.append((f"DEMO_L{lesion:05d}", dx, age, sex, site, *_render(look, size, rng, hair)))
    parts = [out / "HAM10000_images_part_1", out / "HAM10000_images_part_2"]
    masks = out / MASKS_FOLDER
    for folder in (*parts, masks):
        folder.mkdir()
    image_ids = [f"DEMO_{i:06d}" for i in range(len(rows))]
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    for i, (image_id, (lesion_id, dx, age, sex, site, pixels, lesion_mask)) in enumerate(zip(image_ids, rows)):
        folder = parts[0] if i < len(rows) // 2 else parts[1]
        image = Image.fromarray(pixels)
        if image_format == "jpg":
            image.save(folder / f"{image_id}.jpg", quality=92)
        else:
            image.save(folder / f"{image_id}.png")
        Image.fromarray(lesion_mask).save(masks / f"{image_id}_segmentation.png")
        lines.append(f"{lesion_id},{image_id},{dx},synthetic,{age}.0,{sex},{site}")
    (out / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(rows)


def _sample_lesion(style: _Style, rng: np.random.Generator) -> dict:
    """One lesion's fixed look, drawn around its class's style; shared by all its images."""
    n_dots = rng.poisson(style.dots)
    n_vessels = rng.poisson(style.vessels)
    radius = float(np.clip(rng.normal(style.radius, 0.06), 0.12, 0.65))
    return {
        "skin": np.clip(SKIN * rng.uniform(0.78, 1.06) + rng.normal(0, 0.025, 3), 0, 1),
        "color": np.clip(np.array(style.color) + rng.normal(0, 0.055, 3), 0, 1),
        "second": np.clip(np.array(style.second) + rng.normal(0, 0.05, 3), 0, 1),
        "radius": radius,
        "aspect": 1 + abs(rng.normal(0, 0.12)),
        "angle": rng.uniform(0, 2 * np.pi),
        "center": rng.normal(0, 0.08, 2),
        "harmonics": [(k, abs(rng.normal(style.irregularity, 0.03)) * rng.normal(0, 1) / np.sqrt(k - 1),
                       rng.uniform(0, 2 * np.pi)) for k in range(2, 8)],
        "edge": style.edge * rng.uniform(0.7, 1.3),
        "variegation": float(np.clip(rng.normal(style.variegation, 0.08), 0, 1)),
        "waves": [(rng.uniform(1.5, 5) * np.array([np.cos(a), np.sin(a)]), rng.uniform(0, 2 * np.pi))
                  for a in rng.uniform(0, np.pi, 3)],
        "dots": [(radius * np.sqrt(rng.uniform(0, 0.7)) * np.array([np.cos(a), np.sin(a)]),
                  rng.uniform(0.02, 0.05)) for a in rng.uniform(0, 2 * np.pi, n_dots)],
        "dot_color": np.array(style.dot_color),
        "vessels": [(rng.uniform(0, np.pi), rng.uniform(-0.6, 0.6) * radius, rng.uniform(4, 12),
                     rng.uniform(0.03, 0.1), rng.uniform(0, 2 * np.pi)) for _ in range(n_vessels)],
        "white_center": style.white_center * rng.uniform(0.6, 1.0),
        "scales": style.scales * rng.uniform(0.6, 1.2),
        "stripes": style.stripes * rng.uniform(0.5, 1.2),
        "stripe_freq": rng.uniform(14, 22),
    }


def _render(look: dict, size: int, rng: np.random.Generator, hair: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image of a lesion (re-imaged with a small shift, rotation, zoom and lighting change) and its mask.

    The mask (uint8 [S, S], 255 = lesion) is where the drawn lesion covers at least half of a pixel.
    """
    y, x = _grid(size)
    angle = look["angle"] + rng.normal(0, 0.25)
    zoom = rng.uniform(0.92, 1.08)
    center = look["center"] + rng.normal(0, 0.04, 2)
    dx, dy = x - center[0], y - center[1]
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / zoom  # lesion frame: moves with the lesion
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / zoom
    rho, theta = np.hypot(u / look["aspect"], v), np.arctan2(v, u / look["aspect"])
    border = look["radius"] * (1 + sum(a * np.cos(k * theta + p) for k, a, p in look["harmonics"]))
    softness = look["edge"] * look["radius"] + 2.0 / size
    mask = 1 / (1 + np.exp(-(border - rho) / softness))

    field = sum(np.sin(w[0] * u + w[1] * v + p) for w, p in look["waves"]) / 3
    mix = (look["variegation"] * (0.5 + 0.5 * field))[..., None]
    lesion = look["color"] * (1 - mix) + look["second"] * mix
    if look["stripes"]:
        ridge = np.sin(look["stripe_freq"] * u + 2 * np.sin(3 * v))
        lesion = lesion * (1 + look["stripes"] * 0.25 * ridge[..., None])
    for (du, dv), dot_radius in look["dots"]:
        weight = 0.85 * np.exp(-((u - du) ** 2 + (v - dv) ** 2) / (2 * dot_radius ** 2))[..., None]
        lesion = lesion * (1 - weight) + look["dot_color"] * weight
    for vessel_angle, offset, freq, amp, phase in look["vessels"]:
        a = np.cos(vessel_angle) * u + np.sin(vessel_angle) * v
        b = -np.sin(vessel_angle) * u + np.cos(vessel_angle) * v
        weight = 0.8 * np.exp(-((b - offset - amp * np.sin(freq * a + phase)) / 0.025) ** 2)[..., None]
        lesion = lesion * (1 - weight) + np.array([0.70, 0.10, 0.15]) * weight
    if look["white_center"]:
        weight = look["white_center"] * np.exp(-(u ** 2 + v ** 2) / (2 * (0.4 * look["radius"]) ** 2))
        lesion = lesion * (1 - weight[..., None]) + np.array([0.93, 0.88, 0.84]) * weight[..., None]
    if look["scales"]:
        flecks = np.clip(rng.normal(0, 1, (size, size)) - 0.8, 0, None) * look["scales"]
        lesion = lesion + flecks[..., None] * 0.5

    skin = look["skin"] * (1 + 0.04 * np.sin(2.1 * x + 1.3 * y + rng.uniform(0, 6)))[..., None]
    image = skin * (1 - mask[..., None]) + np.clip(lesion, 0, 1) * mask[..., None]
    if hair and rng.random() < 0.25:
        image = _draw_hairs(image, x, y, rng)
    image = image * rng.uniform(0.88, 1.12) + rng.normal(0, 0.02, 3)  # lighting and colour cast
    if rng.random() < 0.3:  # dark rim of a dermoscope's field of view
        rim = np.hypot(x, y) - rng.uniform(1.0, 1.3)
        image = image * np.clip(1 - rim * 8, 0.05, 1)[..., None]
    image = image + rng.normal(0, 0.025, image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), np.where(mask >= 0.5, 255, 0).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1] (y, x), shared by every image of one size (read-only)."""
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    y.flags.writeable = x.flags.writeable = False
    return y, x


def _draw_hairs(image: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    for _ in range(int(rng.integers(1, 5))):
        angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.9, 0.9)
        bend = rng.uniform(-0.3, 0.3)
        distance = np.abs(-np.sin(angle) * x + np.cos(angle) * y - offset - bend * (x ** 2))
        weight = 0.8 * np.exp(-(distance / rng.uniform(0.008, 0.02)) ** 2)[..., None]
        image = image * (1 - weight) + np.array([0.15, 0.1, 0.08]) * weight
    return image


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.data.demo_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to create (must not exist, or be empty)")
    parser.add_argument("--lesions", type=int, default=DEFAULT_LESIONS, help="number of lesions")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="image side in px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image file format")
    args = parser.parse_args(argv)
    root = generate_demo(args.out, args.lesions, args.image_size, args.seed, image_format=args.format)
    info = json.loads((root / DEMO_MARKER).read_text(encoding="utf-8"))
    print(f"wrote {info['n_images']} images of {info['n_lesions']} lesions to {root}")
    return 0


if __name__ == "__main__":
    run_cli(main)
