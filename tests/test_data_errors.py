"""Bad input: each case is one UserError naming the file, row or key at fault."""

from __future__ import annotations

import shutil

import pytest
from data_fixtures import make_ham, make_imagefolder, make_isic, rng_image, write_image

from core.data.dataset import SplitOptions, dataset_fingerprint, load_dataset
from core.errors import UserError


@pytest.fixture(scope="module")
def ham_template(tmp_path_factory):
    return make_ham(tmp_path_factory.mktemp("ham") / "ham", n_lesions=21)


@pytest.fixture
def ham(ham_template, tmp_path):
    return shutil.copytree(ham_template, tmp_path / "ham")


def _load(path, tmp_path, **kw):
    return load_dataset(path, 16, cache_dir=tmp_path / "cache", progress=False, **kw)


def _raises(match, path, tmp_path, **kw) -> str:
    with pytest.raises(UserError, match=match) as info:
        _load(path, tmp_path, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def _edit_metadata(root, edit):
    csv = root / "HAM10000_metadata.csv"
    header, *rows = csv.read_text().splitlines()
    csv.write_text("\n".join(edit([header] + rows)) + "\n")
    return csv


def _first_image(root):
    return sorted((root / "HAM10000_images_part_1").glob("*.jpg"))[0]


def test_truncated_jpeg_names_the_file(tmp_path):
    root = make_imagefolder(tmp_path / "f", ["a", "b"], per_class=2)
    bad = rng_image(root / "a" / "cut.jpg")
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    message = _raises("cannot read image", root, tmp_path)
    assert message.startswith(str(bad))


def test_unreadable_image_names_the_file(ham, tmp_path):
    bad = _first_image(ham)
    bad.write_bytes(b"this is not a JPEG")
    assert _raises("cannot read image", ham, tmp_path).startswith(str(bad))


def test_metadata_without_its_columns_names_them_and_the_file(ham, tmp_path):
    csv = _edit_metadata(ham, lambda rows: [r.split(",", 1)[1] for r in rows])  # drop lesion_id
    _raises(rf"{csv}: missing column\(s\) lesion_id \(found: image_id, dx,", ham, tmp_path)


def test_unknown_label_names_the_row_and_image(ham, tmp_path):
    csv = _edit_metadata(ham, lambda rows: rows[:3] + [rows[3].replace(rows[3].split(",")[2], "melanoma")]
                         + rows[4:])
    image_id = csv.read_text().splitlines()[3].split(",")[1]
    _raises(rf"{csv} line 4 \(image {image_id}\): unknown dx label 'melanoma'", ham, tmp_path)


def test_duplicate_image_id_names_both_lines(ham, tmp_path):
    csv = _edit_metadata(ham, lambda rows: rows + [rows[2]])
    n_lines = len(csv.read_text().splitlines())
    _raises(rf"{csv} line {n_lines}: duplicate image_id .* \(first at line 3\)", ham, tmp_path)


def test_listed_image_that_is_absent_is_named(ham, tmp_path):
    missing = _first_image(ham)
    missing.unlink()
    _raises(rf"image {missing.stem} not found in .*HAM10000_images_part_1", ham, tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    root = make_imagefolder(tmp_path / "f", ["a", "b"], per_class=2)
    (root / "c").mkdir()
    (root / "c" / "README.txt").write_text("no images here")
    _raises(rf"{root / 'c'}: empty class folder", root, tmp_path)


def test_missing_path_and_unknown_layout_say_what_was_looked_for(tmp_path):
    _raises(rf"{tmp_path / 'nowhere'}: no such file or folder", tmp_path / "nowhere", tmp_path)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    (tmp_path / "stuff" / "empty").mkdir()
    message = _raises("no known dataset layout found; looked for", tmp_path / "stuff", tmp_path)
    assert "HAM10000_metadata.csv" in message and "ISIC 2018" in message and "ImageFolder" in message
    with pytest.raises(UserError, match="no known dataset layout"):
        dataset_fingerprint(tmp_path / "stuff")


def test_csv_that_is_no_dataset_csv(tmp_path):
    (tmp_path / "labels.csv").write_text("file,class\na.jpg,x\n")
    _raises("labels.csv: not a dataset CSV", tmp_path / "labels.csv", tmp_path)


def test_isic_row_that_is_not_one_hot_is_named(tmp_path):
    root = make_isic(tmp_path / "isic", ["nv", "mel", "df"])
    csv = root / "ISIC2018_Task3_Training_GroundTruth.csv"
    lines = csv.read_text().splitlines()
    lines[2] = "ISIC_0000001,1.0,1.0,0.0,0.0,0.0,0.0,0.0"
    csv.write_text("\n".join(lines) + "\n")
    _raises(rf"{csv} line 3 \(image ISIC_0000001\): class columns are not exactly one-hot", root, tmp_path)
    lines[2] = "ISIC_0000001,0.5,0.5,0.0,0.0,0.0,0.0,0.0"
    csv.write_text("\n".join(lines) + "\n")
    _raises("line 3 .*not exactly one-hot", root, tmp_path)


def test_isic_without_a_class_column(tmp_path):
    root = make_isic(tmp_path / "isic", ["nv", "mel"])
    csv = root / "ISIC2018_Task3_Training_GroundTruth.csv"
    csv.write_text("\n".join(line.rsplit(",", 1)[0] for line in csv.read_text().splitlines()) + "\n")
    (root / "ISIC2018_Task3_Training_Input" / "LICENSE.txt").unlink()
    _raises(rf"{csv}: missing column\(s\) VASC", csv, tmp_path)


def test_two_files_with_one_id_and_lone_class(tmp_path):
    root = make_imagefolder(tmp_path / "f", ["a", "b"], per_class=1)
    write_image(root / "a" / "img0.jpg")
    _raises("two images share the id a/img0", root, tmp_path)
    lone = make_imagefolder(tmp_path / "lone", ["only"], per_class=2)
    _raises(r"only one class folder \(only/\)", lone, tmp_path)


def test_split_folders_without_train(tmp_path):
    root = make_imagefolder(tmp_path / "f", ["a", "b"], per_class=1, splits=("val", "test"))
    _raises("found but no train/", root, tmp_path)


def test_bad_fractions_and_image_size(ham, tmp_path):
    _raises("split fractions val=0.6, test=0.5", ham, tmp_path, splits=SplitOptions(0.6, 0.5))
    with pytest.raises(UserError, match="image size"):
        load_dataset(ham, 8, cache_dir=tmp_path, progress=False)


def test_too_few_lesions_for_a_validation_split(tmp_path):
    root = make_imagefolder(tmp_path / "f", ["a", "b"], per_class=1)
    _raises("too few lesions for a val split", root, tmp_path)
