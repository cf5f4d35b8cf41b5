"""Lesion masks in the data layer: each layout, resized as the images are, cached, bad masks named."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import core.data.masks
from core.data.dataset import load_dataset
from core.data.demo_data import MASKS_FOLDER
from core.errors import UserError
from tests.data_fixtures import make_ham, make_imagefolder, make_isic

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


@pytest.fixture(scope="module")
def ham_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ham(tmp_path_factory.mktemp("ham") / "ham", n_lesions=28, image_size=32)


def _load(path: Path, tmp_path: Path, size: int = SIZE):
    return load_dataset(path, size, cache_dir=tmp_path / "cache", progress=False)


def _pair(image_path: Path, mask_path: Path, box: tuple[int, int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    """A black image with a white box and its mask (the same box): decoded alike, they must agree."""
    image = Image.new("RGB", size)
    image.paste((255, 255, 255), box)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(image_path)
    mask = Image.new("L", size)
    mask.paste(255, box)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    mask.save(mask_path)


def _check_resized_like_images(data, rows) -> None:
    for i in rows:
        expected = (data.images[i, 0] > 127).astype(np.uint8)   # the box, through the images' own resize
        np.testing.assert_array_equal(data.masks[i], expected)


def test_ham10000_masks_follow_the_drawn_lesions_and_missing_ones_get_none(ham_template, tmp_path) -> None:
    root = shutil.copytree(ham_template, tmp_path / "ham")
    data = _load(root, tmp_path)
    assert data.masks.shape == (len(data.labels), SIZE, SIZE) and data.masks.dtype == np.uint8
    assert data.has_mask.all() and set(np.unique(data.masks)) == {0, 1}
    # the demo's lesions are drawn on lighter skin: inside the mask is darker than outside, image by image
    gray = data.images.mean(1)
    darker = [gray[i][data.masks[i] == 1].mean() < gray[i][data.masks[i] == 0].mean() for i in range(len(gray))
              if 0 < data.masks[i].sum() < SIZE * SIZE]
    assert np.mean(darker) > 0.9
    gone = sorted((root / MASKS_FOLDER).iterdir())[:2]
    for path in gone:
        path.unlink()
    again = _load(root, tmp_path)
    ids = [path.name.removesuffix("_segmentation.png") for path in gone]
    missing = np.isin(again.image_ids, ids)
    assert missing.sum() == 2 and not again.has_mask[missing].any() and again.has_mask[~missing].all()
    assert not again.masks[missing].any()
    unread = load_dataset(root, SIZE, cache_dir=tmp_path / "cache", progress=False, masks=False)  # for training
    assert unread.masks is None and unread.has_mask is None
    shutil.rmtree(root / MASKS_FOLDER)
    assert _load(root, tmp_path).masks is None and _load(root, tmp_path).has_mask is None


def test_ham10000_masks_are_resized_exactly_as_their_images(ham_template, tmp_path) -> None:
    root = shutil.copytree(ham_template, tmp_path / "ham")
    first = sorted((root / "HAM10000_images_part_1").glob("*.jpg"))[:3]
    for k, jpg in enumerate(first):  # non-square PNG images with a box off-centre
        jpg.unlink()
        _pair(jpg.with_suffix(".png"), root / MASKS_FOLDER / f"{jpg.stem}_segmentation.png",
              (3 + 5 * k, 2, 25 + 3 * k, 21))
    data = _load(root, tmp_path)
    _check_resized_like_images(data, [list(data.image_ids).index(p.stem) for p in first])


def test_isic_task1_masks_beside_a_task3_layout(tmp_path) -> None:
    root = make_isic(tmp_path / "isic", ["mel", "nv", "nv", "bcc", "mel", "nv", "bkl", "nv", "mel", "nv"] * 2)
    inputs = root / "ISIC2018_Task3_Training_Input"
    truth = root / "ISIC2018_Task1_Training_GroundTruth"
    for k, image in enumerate(sorted(inputs.glob("*.jpg"))[:6]):
        image.unlink()
        _pair(image.with_suffix(".png"), truth / f"{image.stem}_segmentation.png", (2 + k, 4, 30, 25))
    data = _load(root, tmp_path)
    assert data.layout == "isic2018" and data.has_mask.tolist() == [True] * 6 + [False] * 14
    _check_resized_like_images(data, range(6))


def test_imagefolder_masks_mirror_the_tree_and_masks_is_no_class(tmp_path) -> None:
    root = make_imagefolder(tmp_path / "f", ["mel", "nv"], per_class=4, splits=("train", "test"))
    _pair(root / "train" / "mel" / "img0.png", root / "masks" / "train" / "mel" / "img0.png", (5, 5, 20, 20))
    _pair(root / "test" / "nv" / "img1.png", root / "masks" / "test" / "nv" / "img1_segmentation.png",
          (10, 3, 38, 28))
    data = _load(root, tmp_path)
    assert data.class_names == ("mel", "nv") and not any("masks" in i for i in data.image_ids)
    rows = [list(data.image_ids).index(i) for i in ("train/mel/img0", "test/nv/img1")]
    assert data.has_mask.sum() == 2 and data.has_mask[rows].all()
    _check_resized_like_images(data, rows)
    flat = make_imagefolder(tmp_path / "flat", ["a", "b"], per_class=3)
    _pair(flat / "a" / "img0.png", flat / "masks" / "a" / "img0.png", (0, 0, 12, 10))
    assert _load(flat, tmp_path).class_names == ("a", "b")
    assert _load(make_imagefolder(tmp_path / "none", ["a", "b"]), tmp_path).masks is None


def test_masks_are_decoded_once_and_again_when_one_changes(ham_template, tmp_path, monkeypatch) -> None:
    root = shutil.copytree(ham_template, tmp_path / "ham")
    first = _load(root, tmp_path)
    calls = []
    real = core.data.masks.decode_mask
    monkeypatch.setattr(core.data.masks, "decode_mask", lambda *a: calls.append(a) or real(*a))
    np.testing.assert_array_equal(_load(root, tmp_path).masks, first.masks)
    assert calls == []
    mask = sorted((root / MASKS_FOLDER).iterdir())[0]
    Image.new("L", Image.open(mask).size, 255).save(mask)
    changed = _load(root, tmp_path)
    assert len(calls) == len(first.labels)
    row = list(changed.image_ids).index(mask.name.removesuffix("_segmentation.png"))
    assert changed.masks[row].all() and not first.masks[row].all()


@pytest.mark.parametrize("problem", ["size", "unreadable", "two"])
def test_bad_masks_are_one_line_errors_naming_the_file(ham_template, tmp_path, problem) -> None:
    root = shutil.copytree(ham_template, tmp_path / "ham")
    mask = sorted((root / MASKS_FOLDER).iterdir())[0]
    if problem == "size":
        Image.new("L", (31, 32)).save(mask)
        match = "mask is 31x32 but its image .* is 32x32"
    elif problem == "unreadable":
        mask.write_bytes(b"not a PNG")
        match = "cannot read mask"
    else:
        (root / "more_segmentations").mkdir()
        shutil.copy(mask, root / "more_segmentations" / mask.name)
        match = "two mask files for image"
    with pytest.raises(UserError, match=match) as info:
        _load(root, tmp_path)
    assert str(mask.name) in str(info.value) and "\n" not in str(info.value)
    if problem == "size":  # as a user meets it: one line, exit status 2
        result = subprocess.run([sys.executable, "-m", "core.data", "--data", str(root), "--image-size", "16",
                                 "--cache-dir", str(tmp_path / "c2")], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(f"error: {mask}")
        assert "Traceback" not in result.stderr
