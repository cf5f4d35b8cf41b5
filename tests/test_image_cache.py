"""Decoding (every colour mode to RGB, EXIF orientation, squash resize) and the on-disk image cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_fixtures import make_imagefolder, write_image
from PIL import Image

import core.data.image_cache
from core.data.dataset import SplitOptions, dataset_fingerprint, decode_image, load_dataset
from core.data.image_cache import cache_file


def _rgb_at(pixels: np.ndarray, y: int, x: int) -> np.ndarray:
    return pixels[:, y, x].astype(int)


@pytest.mark.parametrize("mode, suffix, value, expected", [
    ("L", ".jpg", 120, (120, 120, 120)),
    ("L", ".png", 200, (200, 200, 200)),
    ("CMYK", ".jpg", (0, 255, 255, 0), (255, 0, 0)),
    ("RGBA", ".png", (10, 200, 30, 128), (10, 200, 30)),
    ("LA", ".png", (90, 255), (90, 90, 90)),
    ("I;16", ".png", 65535, (255, 255, 255)),
    ("RGB", ".bmp", (1, 2, 250), (1, 2, 250)),
    ("RGB", ".webp", (30, 60, 90), (30, 60, 90)),
])
def test_every_colour_mode_decodes_to_rgb(tmp_path, mode, suffix, value, expected):
    path = tmp_path / f"image{suffix}"
    Image.new(mode, (20, 14), value).save(path, **({"lossless": True} if suffix == ".webp" else {}))
    pixels = decode_image(path, 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == np.uint8 and pixels.flags.c_contiguous
    assert np.abs(_rgb_at(pixels, 8, 8) - expected).max() <= 6


def test_palette_png_with_transparency(tmp_path):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    assert tuple(_rgb_at(decode_image(tmp_path / "p.png", 16), 3, 3)) == (250, 10, 10)


def test_exif_orientation_is_applied_and_the_whole_image_squashed(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": red ends up on top
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    pixels = decode_image(tmp_path / "rotated.jpg", 16)
    assert np.abs(_rgb_at(pixels, 2, 8) - (255, 0, 0)).max() < 40
    assert np.abs(_rgb_at(pixels, 13, 8) - (0, 0, 255)).max() < 40
    image.save(tmp_path / "plain.png")
    pixels = decode_image(tmp_path / "plain.png", 16)  # squashed, not cropped: both halves visible
    assert tuple(_rgb_at(pixels, 8, 1)) == (255, 0, 0) and tuple(_rgb_at(pixels, 8, 14)) == (0, 0, 255)


@pytest.fixture
def folders(tmp_path):
    return make_imagefolder(tmp_path / "folders", ["a", "b"], per_class=6)


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    original = core.data.image_cache.decode_image

    def counting(path, size):
        calls.append(path)
        return original(path, size)

    monkeypatch.setattr(core.data.image_cache, "decode_image", counting)
    return calls


def test_second_load_uses_the_cache_without_decoding(folders, tmp_path, count_decodes):
    first = load_dataset(folders, 16, cache_dir=tmp_path / "cache", progress=False)
    assert len(count_decodes) == 12
    path = cache_file(tmp_path / "cache", first.fingerprint, 16)
    assert path.is_file()
    second = load_dataset(folders, 16, SplitOptions(seed=5), cache_dir=tmp_path / "cache", progress=False)
    assert len(count_decodes) == 12  # nothing decoded again, whatever the split
    assert np.array_equal(first.images, second.images) and second.images.flags.c_contiguous
    second.images[0, 0, 0, 0] ^= 1  # copy-on-write: a writable array that leaves the cache alone
    assert np.array_equal(np.load(path), first.images)
    load_dataset(folders, 24, cache_dir=tmp_path / "cache", progress=False)
    assert len(count_decodes) == 24  # another size is another cache file


def test_changed_data_is_decoded_again(folders, tmp_path, count_decodes):
    first = load_dataset(folders, 16, cache_dir=tmp_path / "cache", progress=False)
    target = folders / "a" / "img0.png"
    write_image(target, (1, 2, 3))
    os.utime(target, ns=(1, 1))  # a new mtime, whatever the clock's resolution
    assert dataset_fingerprint(folders) != first.fingerprint
    second = load_dataset(folders, 16, cache_dir=tmp_path / "cache", progress=False)
    assert len(count_decodes) == 24
    index = list(second.image_ids).index("a/img0")
    assert tuple(_rgb_at(second.images[index], 8, 8)) == (1, 2, 3)
    write_image(folders / "b" / "img9.jpg", (9, 9, 9))  # a new file changes the fingerprint too
    assert dataset_fingerprint(folders) != second.fingerprint


def test_damaged_cache_file_is_rebuilt(folders, tmp_path, count_decodes):
    first = load_dataset(folders, 16, cache_dir=tmp_path / "cache", progress=False)
    cache_file(tmp_path / "cache", first.fingerprint, 16).write_bytes(b"not a numpy file")
    second = load_dataset(folders, 16, cache_dir=tmp_path / "cache", progress=False)
    assert len(count_decodes) == 24 and np.array_equal(first.images, second.images)
    assert np.array_equal(np.load(cache_file(tmp_path / "cache", first.fingerprint, 16)), first.images)


def test_fingerprint_ignores_where_the_dataset_lies_and_non_image_files(folders, tmp_path):
    before = dataset_fingerprint(folders)
    (folders / "a" / "notes.txt").write_text("ignored")
    assert dataset_fingerprint(folders) == before
    moved = folders.rename(tmp_path / "moved")  # a move keeps names, sizes and mtimes
    assert dataset_fingerprint(moved) == before
