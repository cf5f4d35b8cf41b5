"""core/evaluation/subgroups.py (results per metadata group, the minimum-size rule) and the metadata of core/data/layouts.py."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.evaluation.subgroups import MIN_LESIONS, subgroup_results, subgroup_variables


def test_subgroup_variables_band_ages_and_skip_ids() -> None:
    metadata = pd.DataFrame({"age": ["25.0", "30", "44.0", "45", "75", ""],
                             "sex": ["male", "female", "", "male", "female", "male"],
                             "lesion_note": [f"free text {i}" for i in range(6)],   # 6 levels of 6 images: kept
                             "site": ["back"] * 6,                                 # one level: not a variable
                             "size_mm": ["1", "2", "3", "4", "5", "6"]})
    variables = subgroup_variables(metadata)
    assert list(variables["age"]) == ["<30", "30-44", "30-44", "45-59", ">=75", "unknown"]
    assert list(variables["sex"]) == ["male", "female", "unknown", "male", "female", "male"]
    assert "site" not in variables and len(np.unique(variables["size_mm"])) == 4  # quartiles
    assert "lesion_note" in variables
    ids = pd.DataFrame({"image_ref": [f"x{i}" for i in range(40)]})
    assert subgroup_variables(ids) == {}  # 40 levels: an id, not a group
    assert subgroup_variables(None) == {}


def test_groups_below_the_minimum_lesion_count_are_listed_not_scored() -> None:
    # Group "big" has MIN_LESIONS lesions, group "small" one fewer; each lesion has two images.
    n_big, n_small = MIN_LESIONS, MIN_LESIONS - 1
    lesions = np.repeat(np.arange(n_big + n_small), 2).astype(str)
    where = np.where(np.repeat(np.arange(n_big + n_small), 2) < n_big, "big", "small")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, len(lesions))
    probs = rng.dirichlet(np.ones(3), len(lesions))
    rows = {row["group"]: row for row in subgroup_results(labels, probs, lesions, pd.DataFrame({"where": where}),
                                                          positive=1, n_resamples=100, seed=0)["where"]}
    big, small = rows["big"], rows["small"]
    assert (big["n_lesions"], big["n_images"], big["too_small"]) == (n_big, 2 * n_big, False)
    assert (small["n_lesions"], small["n_images"], small["too_small"]) == (n_small, 2 * n_small, True)
    assert "balanced_accuracy" not in small and "sensitivity" not in small
    low, high = big["balanced_accuracy_ci"]
    assert 0 <= low <= big["balanced_accuracy"] <= high <= 1
    members = where == "big"
    mel = labels[members] == 1
    assert big["sensitivity"] == (probs[members].argmax(1)[mel] == 1).mean()
    assert big["n_positive_lesions"] == len(np.unique(lesions[members][mel]))


def test_layouts_keep_the_other_metadata_columns(tmp_path) -> None:
    from core.data.layouts import read_layout
    from data_fixtures import make_ham, make_imagefolder, make_isic

    ham = read_layout(make_ham(tmp_path / "ham", n_lesions=12))
    table = pd.read_csv(tmp_path / "ham" / "HAM10000_metadata.csv", dtype=str).set_index("image_id")
    assert list(ham.metadata.columns) == ["dx_type", "age", "sex", "localization"]
    assert list(ham.metadata["sex"]) == list(table.loc[ham.image_ids, "sex"])  # in the listing's (sorted) order

    isic = read_layout(make_isic(tmp_path / "isic", ["mel", "nv", "nv"], lesions=["L1", "L2", "L2"]))
    assert list(isic.metadata.columns) == ["diagnosis_confirm_type"] and list(isic.groups) == ["L1", "L2", "L2"]
    assert read_layout(make_imagefolder(tmp_path / "folders", ["a", "b"])).metadata is None
