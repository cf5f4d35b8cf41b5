"""The synthetic demo dataset: deterministic, HAM10000-shaped, imbalanced like HAM10000, and learnable."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

import core.data.dataset
from core.data import demo_data
from core.data.dataset import SplitOptions, load_dataset
from core.data.demo_data import class_counts, generate_demo
from core.errors import UserError
from core.data.layouts import DEMO_MARKER, HAM_CLASSES, read_layout


def _digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate_demo(tmp_path_factory.mktemp("demo") / "demo", n_lesions=120, image_size=32, seed=0)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    first = generate_demo(tmp_path / "a", n_lesions=14, image_size=16, seed=1)
    second = generate_demo(tmp_path / "b", n_lesions=14, image_size=16, seed=1)
    third = generate_demo(tmp_path / "c", n_lesions=14, image_size=16, seed=2)
    assert _digest(first) == _digest(second) != _digest(third)


def test_class_mix_follows_ham10000_with_a_floor():
    counts = class_counts(730)
    assert sum(counts.values()) == 730 and min(counts.values()) >= 6
    assert abs(counts["nv"] / 730 - 0.67) < 0.02 and abs(counts["mel"] / 730 - 0.11) < 0.01
    assert counts["nv"] > counts["mel"] > counts["bcc"] > counts["akiec"] > counts["vasc"]
    small = class_counts(40)
    assert sum(small.values()) == 40 and min(small.values()) == 5 and max(small, key=small.get) == "nv"
    with pytest.raises(UserError, match="at least 7 lesions"):
        class_counts(5)


def test_demo_is_a_ham10000_layout_with_several_images_per_lesion(demo):
    info = json.loads((demo / DEMO_MARKER).read_text())
    assert info["generator"] == "demo-ham10000-v2" and info["n_lesions"] == 120
    assert all(any((demo / part).iterdir()) for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"))
    listing = read_layout(demo)
    assert listing.layout == "demo" and listing.class_names == HAM_CLASSES
    assert len(listing.image_ids) == info["n_images"]
    _, per_lesion = np.unique(listing.groups, return_counts=True)
    assert len(per_lesion) == 120 and per_lesion.max() >= 3 and 1.5 < per_lesion.mean() < 2.6
    lesions = {c: len(np.unique(listing.groups[listing.labels == i])) for i, c in enumerate(HAM_CLASSES)}
    assert lesions == class_counts(120)


def test_classes_are_learnable_from_downscaled_pixels(demo, tmp_path):
    data = load_dataset(demo, 32, SplitOptions(0.3, 0.0), cache_dir=tmp_path, progress=False)
    pooled = data.images.reshape(len(data.labels), 3, 8, 4, 8, 4).mean(axis=(3, 5))
    features = pooled.reshape(len(data.labels), -1) / 255.0
    train, val = data.indices("train"), data.indices("val")
    model = LogisticRegression(max_iter=2000, class_weight="balanced").fit(features[train], data.labels[train])
    score = balanced_accuracy_score(data.labels[val], model.predict(features[val]))
    assert score > 0.35, score  # chance is 1/7; a linear model on 8x8 pixels reaches about 0.6


def test_png_format_and_target_folder_rules(tmp_path):
    root = generate_demo(tmp_path / "png", n_lesions=7, image_size=16, image_format="png")
    assert {p.suffix for p in (root / "HAM10000_images_part_1").iterdir()} == {".png"}
    assert read_layout(root).layout == "demo"
    with pytest.raises(UserError, match="is not an empty folder"):
        generate_demo(root, n_lesions=7, image_size=16)
    (tmp_path / "empty").mkdir()
    assert generate_demo(tmp_path / "empty", n_lesions=7, image_size=16) == tmp_path / "empty"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_commands_print_what_they_made(tmp_path, capsys):
    assert demo_data.main([str(tmp_path / "cli"), "--lesions", "21", "--image-size", "16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert core.data.dataset.main(["--data", str(tmp_path / "cli"), "--image-size", "16",
                           "--cache-dir", str(tmp_path / "cache"), "--write-splits", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "demo dataset at" in out and "lesions in more than one split: 0" in out
    assert (tmp_path / "s.csv").read_text().startswith("image_id,label,group,split\n")
