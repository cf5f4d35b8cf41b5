"""Splits: grouped by lesion, stratified by class, seeded and deterministic; splits.csv reuse."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import make_ham

from core.data.dataset import SplitOptions, load_dataset
from core.data.splits import write_splits
from core.errors import UserError
from core.data.splits import assign_splits


def _synthetic_table(seed: int = 0):
    """~600 images of ~400 lesions, 1-4 images each, HAM-like imbalance with two 6-lesion classes."""
    rng = np.random.default_rng(seed)
    lesions_per_class = [20, 30, 60, 6, 60, 220, 6]
    labels, groups = [], []
    for cls, n in enumerate(lesions_per_class):
        for lesion in range(n):
            k = int(rng.integers(1, 5))
            labels += [cls] * k
            groups += [f"L{cls}_{lesion}"] * k
    return np.array(labels), np.array(groups)


def _split(labels, groups, seed=0, val=0.15, test=0.15):
    return assign_splits(labels, groups, val_fraction=val, test_fraction=test, seed=seed)


def test_no_lesion_in_two_splits_and_every_class_in_every_split():
    labels, groups = _synthetic_table()
    split = _split(labels, groups)
    assert len(set(zip(groups, split))) == len(set(groups))
    for name in ("train", "val", "test"):
        assert set(labels[split == name]) == set(range(7)), name  # the 6-lesion classes too
    share = np.array([np.mean(split == name) for name in ("train", "val", "test")])
    assert np.allclose(share, [0.7, 0.15, 0.15], atol=0.03)
    common = labels == 5  # the big class follows the fractions closely
    assert abs(np.mean(split[common] == "val") - 0.15) < 0.03


def test_same_seed_same_split_other_seed_other_split_row_order_irrelevant():
    labels, groups = _synthetic_table()
    first = _split(labels, groups, seed=3)
    assert np.array_equal(first, _split(labels, groups, seed=3))
    assert not np.array_equal(first, _split(labels, groups, seed=4))
    order = np.random.default_rng(1).permutation(len(labels))
    shuffled = _split(labels[order], groups[order], seed=3)
    assert np.array_equal(shuffled, first[order])


def test_too_few_lesions_fill_train_then_val():
    labels = np.array([0, 0, 1, 1, 1, 2])
    groups = np.array(["a", "a", "b", "c", "c", "d"])
    split = _split(labels, groups)
    assert split[0] == split[1] == "train"      # class 0: one lesion -> train
    assert sorted({split[2], split[3]}) == ["train", "val"]  # class 1: two lesions -> train and val
    assert split[5] == "train"


def test_zero_test_fraction_makes_no_test_split():
    labels, groups = _synthetic_table()
    split = _split(labels, groups, val=0.2, test=0.0)
    assert set(split) == {"train", "val"}


def test_image_without_lesion_id_is_its_own_group(tmp_path):
    root = make_ham(tmp_path / "ham", n_lesions=21)
    csv = root / "HAM10000_metadata.csv"
    header, *rows = csv.read_text().splitlines()
    rows = ["," + row.split(",", 1)[1] for row in rows]  # every lesion id blank
    csv.write_text("\n".join([header] + rows) + "\n")
    data = load_dataset(root, 16, cache_dir=tmp_path / "cache", progress=False)
    assert len(np.unique(data.groups)) == len(data.groups)
    assert list(data.groups) == list(data.image_ids)


@pytest.fixture(scope="module")
def ham(tmp_path_factory):
    return make_ham(tmp_path_factory.mktemp("ham") / "ham", n_lesions=40)


def test_splits_file_is_reused_exactly(ham, tmp_path):
    cache = tmp_path / "cache"
    first = load_dataset(ham, 16, SplitOptions(seed=0), cache_dir=cache, progress=False)
    write_splits(first, tmp_path / "splits.csv")
    lines = (tmp_path / "splits.csv").read_text().splitlines()
    assert lines[0] == "image_id,label,group,split" and len(lines) == len(first.labels) + 1
    other = load_dataset(ham, 16, SplitOptions(seed=7), cache_dir=cache, progress=False)
    assert not np.array_equal(other.split, first.split)
    reused = load_dataset(ham, 16, SplitOptions(0.3, seed=7, splits_file=tmp_path / "splits.csv"),
                          cache_dir=cache, progress=False)
    assert np.array_equal(reused.split, first.split)


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[:-1], "is not in the splits file"),
    (lambda rows: rows + ["NOT_AN_IMAGE,nv,L,train"], r"line \d+: image NOT_AN_IMAGE is not in the dataset"),
    (lambda rows: [rows[0].rsplit(",", 1)[0] + ",holdout"] + rows[1:], "line 2: split 'holdout'"),
    (lambda rows: [rows[0].replace(rows[0].split(",")[1], "zzz")] + rows[1:],
     "line 2: image DEMO_000000 has label 'zzz'"),
    (lambda rows: rows + rows[-1:], "is listed twice"),
])
def test_splits_file_must_match_the_dataset(ham, tmp_path, edit, message):
    cache = tmp_path / "cache"
    data = load_dataset(ham, 16, cache_dir=cache, progress=False)
    path = tmp_path / "splits.csv"
    write_splits(data, path)
    header, *rows = path.read_text().splitlines()
    path.write_text("\n".join([header] + edit(rows)) + "\n")
    with pytest.raises(UserError, match=message) as info:
        load_dataset(ham, 16, SplitOptions(splits_file=path), cache_dir=cache, progress=False)
    assert str(path) in str(info.value)


def test_splits_file_without_its_columns_or_absent(ham, tmp_path):
    path = tmp_path / "splits.csv"
    path.write_text("image,fold\nx,1\n")
    with pytest.raises(UserError, match=r"splits.csv: missing column\(s\) image_id, split"):
        load_dataset(ham, 16, SplitOptions(splits_file=path), cache_dir=tmp_path, progress=False)
    with pytest.raises(UserError, match="nope.csv: cannot read splits file"):
        load_dataset(ham, 16, SplitOptions(splits_file=tmp_path / "nope.csv"), cache_dir=tmp_path, progress=False)
