"""Every supported layout loads with the right labels, groups, ids and splits."""

from __future__ import annotations

import functools
import logging
import shutil

import numpy as np
import pytest
from data_fixtures import PALETTE, ham_labels, make_ham, make_imagefolder, make_isic, move_images

import core.data.dataset
from core.data.demo_data import generate_demo
from core.data.layouts import HAM_CLASSES, read_layout
from core.data.splits import assign_splits

PARTS = ("HAM10000_images_part_1", "HAM10000_images_part_2")


@pytest.fixture(scope="module")
def ham_template(tmp_path_factory: pytest.TempPathFactory):
    return make_ham(tmp_path_factory.mktemp("ham") / "ham")


def _copy(template, tmp_path):
    return shutil.copytree(template, tmp_path / "data")


def _load(path, tmp_path, **kw):
    return core.data.dataset.load_dataset(path, 16, cache_dir=tmp_path / "cache", progress=False, **kw)


def _check_ham_labels(data, root):
    expected = ham_labels(root)
    assert data.class_names == HAM_CLASSES
    assert sorted(expected) == list(data.image_ids)
    assert [data.class_names[i] for i in data.labels] == [expected[i] for i in data.image_ids]


@pytest.mark.parametrize("variant", ["part_1", "part1", "images_folder", "root_folder", "no_extension"])
def test_ham10000_variants_load_with_their_labels(ham_template, tmp_path, variant):
    root = _copy(ham_template, tmp_path)
    if variant == "part1":
        for part in PARTS:
            (root / part).rename(root / part.replace("part_", "part"))
    elif variant == "images_folder":
        move_images([root / p for p in PARTS], root / "images")
    elif variant == "root_folder":
        move_images([root / p for p in PARTS], root)
    elif variant == "no_extension":
        (root / "HAM10000_metadata.csv").rename(root / "HAM10000_metadata")
    expected = ham_labels(ham_template)
    data = _load(root, tmp_path)
    assert data.layout == "ham10000"
    _check_ham_labels(data, ham_template)
    assert data.images.shape == (len(expected), 3, 16, 16) and data.images.dtype == np.uint8
    assert data.images.flags.c_contiguous
    lesion = dict(line.split(",")[1::-1] for line in
                  (ham_template / "HAM10000_metadata.csv").read_text().splitlines()[1:])
    assert list(data.groups) == [lesion[i] for i in data.image_ids]
    assert data.root == str(root.resolve())


def test_ham10000_metadata_order_does_not_matter(ham_template, tmp_path):
    root = _copy(ham_template, tmp_path)
    first = read_layout(root)
    csv = root / "HAM10000_metadata.csv"
    header, *rows = csv.read_text().splitlines()
    csv.write_text("\n".join([header] + rows[::-1]) + "\n")
    second = read_layout(root)
    assert list(first.image_ids) == list(second.image_ids)
    assert np.array_equal(first.labels, second.labels)


def test_isic2018_one_hot_columns_map_by_name(tmp_path):
    dx = ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "nv", "mel"]
    lesions = ["L1", "L2", "L3", "L4", "L5", "L6", "L7", "L2", ""]
    root = make_isic(tmp_path / "isic", dx, lesions)
    (root / "ISIC2018_Task3_Training_Input" / "ATTRIBUTION.txt").write_text("ISIC archive\n")
    listing = read_layout(root)
    assert listing.layout == "isic2018" and listing.class_names == HAM_CLASSES
    assert [listing.class_names[i] for i in listing.labels] == dx  # ids sort in the order written
    assert list(listing.groups) == lesions[:-1] + ["ISIC_0000008"]  # no lesion id: its own group


def test_isic2018_ground_truth_in_its_own_folder_or_given_as_file(tmp_path):
    root = make_isic(tmp_path / "isic", ["nv", "mel", "df"])
    (root / "gt").mkdir()
    (root / "ISIC2018_Task3_Training_GroundTruth.csv").rename(root / "gt" / "ISIC2018_Task3_Training_GroundTruth.csv")
    listing = read_layout(root)  # as the official zip unpacks: the CSV in a folder of its own
    assert [listing.class_names[i] for i in listing.labels] == ["nv", "mel", "df"]
    assert list(listing.groups) == list(listing.image_ids)
    by_file = read_layout(root / "gt" / "ISIC2018_Task3_Training_GroundTruth.csv")
    assert list(by_file.image_ids) == list(listing.image_ids)


def test_imagefolder_with_predefined_splits_keeps_them(tmp_path):
    root = make_imagefolder(tmp_path / "folders", ["cat_b", "cat_a"], per_class=2, splits=("train", "val", "test"))
    make_imagefolder(root, ["only_in_train"], per_class=3, splits=("train",))
    (root / "train" / "cat_a" / "notes.txt").write_text("not an image")
    (root / "train" / "cat_a" / ".DS_Store").write_bytes(b"\0\1")
    data = _load(root, tmp_path)
    assert data.layout == "imagefolder"
    assert data.class_names == ("cat_a", "cat_b", "only_in_train")
    assert len(data.labels) == 2 * 2 * 3 + 3
    for index in range(len(data.labels)):
        split, class_name = data.image_ids[index].split("/")[:2]
        assert data.split[index] == split and data.class_names[data.labels[index]] == class_name
    assert "train/cat_a/img0" in data.image_ids
    assert list(data.groups) == list(data.image_ids)
    # the pixels follow the labels (one colour per class folder; 'only_in_train' was written as colour 0)
    colors = {"cat_b": PALETTE[0], "cat_a": PALETTE[1], "only_in_train": PALETTE[0]}
    for index in range(len(data.labels)):
        pixel = data.images[index, :, 8, 8]
        assert np.abs(pixel.astype(int) - colors[data.class_names[data.labels[index]]]).max() <= 3


def test_imagefolder_missing_test_split_is_drawn_from_train(tmp_path):
    root = make_imagefolder(tmp_path / "folders", ["a", "b"], per_class=10, splits=("train",))
    make_imagefolder(root, ["a", "b"], per_class=2, splits=("valid",))
    data = _load(root, tmp_path, splits=core.data.dataset.SplitOptions(test_fraction=0.3))
    from_valid = np.char.startswith(data.image_ids.astype(str), "valid/")
    assert set(data.split[from_valid]) == {"val"}  # the given val split is kept as it is
    assert set(data.split[~from_valid]) == {"train", "test"}  # test comes out of train/
    assert 4 <= np.sum(data.split == "test") <= 8


def test_imagefolder_one_root_with_14_classes(tmp_path):
    classes = [f"class_{i:02d}" for i in range(14)][::-1]
    root = make_imagefolder(tmp_path / "folders", classes, per_class=4)
    (root / "LICENSE").write_text("MIT")
    (root / "class_03" / "README.md").write_text("about")
    data = _load(root, tmp_path)
    assert data.class_names == tuple(sorted(classes)) and len(data.labels) == 14 * 4
    assert [data.class_names[i] for i in data.labels] == [i.split("/")[0] for i in data.image_ids]
    assert set(data.split) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        assert len(np.unique(data.labels[data.indices(split)])) == 14  # every class in every split


def test_demo_dataset_is_the_default(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(core.data.dataset, "generate_demo", functools.partial(generate_demo, n_lesions=30, image_size=32))
    with caplog.at_level(logging.INFO, logger="core.data.dataset"):
        data = core.data.dataset.load_dataset(None, 16, cache_dir=tmp_path, progress=False)
    assert data.layout == "demo" and data.class_names == HAM_CLASSES
    assert data.root == str(tmp_path / "demo-ham10000-v2")
    assert "no --data given: using the built-in synthetic demo dataset at" in caplog.text
    assert set(data.labels) == set(range(7)) and len(np.unique(data.groups)) == 30
    again = core.data.dataset.load_dataset(None, 16, cache_dir=tmp_path, progress=False)  # not generated twice
    assert again.fingerprint == data.fingerprint
    assert core.data.dataset.dataset_fingerprint(None, cache_dir=tmp_path) == data.fingerprint


def test_real_ham10000_copy_reads_and_splits_by_lesion(ham10000_path):
    listing = read_layout(ham10000_path)  # the label table only: no decoding in the test suite
    assert listing.layout == "ham10000" and len(listing.image_ids) == 8553
    counts = dict(zip(listing.class_names, np.bincount(listing.labels).tolist()))
    assert counts == {"akiec": 284, "bcc": 440, "bkl": 943, "df": 101, "mel": 954, "nv": 5713, "vasc": 118}
    assert len(np.unique(listing.groups)) == 6350
    split = assign_splits(listing.labels, listing.groups, val_fraction=0.15, test_fraction=0.15, seed=0)
    pairs = set(zip(listing.groups, split))
    assert len(pairs) == 6350  # no lesion in two splits
    for name in ("val", "test"):
        share = np.bincount(listing.labels[split == name], minlength=7) / np.bincount(listing.labels)
        assert np.all(np.abs(share - 0.15) < 0.03)
