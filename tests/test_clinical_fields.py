"""Clinical fields (age, sex, site) as model input: encoding (missing, unknown, out of range), the dataset's columns, the model
file's round trip, metadata dropout, and the commands that pass it (core.predict --age/--sex/--site)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import TrainConfig
from core.data.dataset import SplitOptions, load_dataset
from core.data.demo_data import generate_demo
from core.errors import UserError, run_cli
from core.model.loading import load_for_inference
from core.model.fields import FIELDS, SEXES, SITES, drop_fields, encode_dataset, encode_records, make_spec, table_records, unknown_rows, validate_record
from core.model.networks import build_model
from core.train import RunOptions, train
from tests.data_fixtures import make_imagefolder

SIZE = 32
QUIET = RunOptions(progress=False, tensorboard=False)
SPEC = make_spec("concat")


def test_encoding_of_known_missing_and_unknown_fields() -> None:
    assert FIELDS == ("age", "sex", "site") and SPEC["width"] == 2 + len(SEXES) + len(SITES)
    rows = encode_records([{"age": 55, "sex": "female", "site": "back"},
                           {"age": "40.0", "sex": "MALE ", "site": "posterior torso"},   # ISIC's site names
                           {"age": None, "sex": "unknown", "site": "unknown"},
                           {"age": "", "sex": None, "site": "head/neck"},
                           {}], SPEC)
    assert rows.dtype == np.float32 and rows.shape == (5, SPEC["width"])
    site = 2 + len(SEXES) + SITES.index("back")
    np.testing.assert_allclose(rows[0, :4], [0.55, 0, 1, 0], atol=1e-7)
    assert rows[0, site] == 1 and rows[0].sum() == pytest.approx(2.55, abs=1e-6)
    np.testing.assert_allclose(rows[1, :4], [0.40, 0, 0, 1], atol=1e-7)
    assert rows[1, site] == 1  # posterior torso is the back
    for unknown in rows[2:]:  # age missing: value 0, flag 1; sex and site: all zeros
        np.testing.assert_array_equal(unknown, unknown_rows(1, SPEC)[0])
        assert unknown[1] == 1 and unknown.sum() == 1
    assert encode_records([{"age": 50}], None).shape == (1, 0)  # an image-only model takes none


@pytest.mark.parametrize("record, message", [
    ({"age": 130}, r"'age' = 130: out of range \[0, 120\]"),
    ({"age": -1}, r"'age' = -1: out of range"),
    ({"age": "fifty"}, r"'age' = 'fifty': not a number"),
    ({"sex": "x"}, r"'sex' = 'x': not one of female, male"),
    ({"site": "elbow"}, r"'site' = 'elbow': not one of abdomen"),
    ({"dx_type": "histo"}, r"unknown clinical field 'dx_type'"),
])
def test_bad_values_are_errors_naming_field_and_value(record, message) -> None:
    with pytest.raises(UserError, match=message):
        validate_record(record)
    with pytest.raises(UserError, match=message):
        encode_records([record], SPEC)


def test_the_table_needs_each_column_and_names_the_image_of_a_bad_value() -> None:
    table = pd.DataFrame({"age": ["50.0", "abc"], "sex": ["male", "female"], "localization": ["back", "face"]})
    with pytest.raises(UserError, match=r"data.csv: image IMG_2: clinical field 'age' = 'abc': not a number"):
        table_records(table, ["IMG_1", "IMG_2"], "data.csv")
    with pytest.raises(UserError, match=r"data.csv: metadata column 'sex' missing \(found: age, localization\)"):
        table_records(table.drop(columns=["sex"]), ["IMG_1", "IMG_2"], "data.csv")
    isic = pd.DataFrame({"age_approx": ["45"], "sex": ["female"], "anatom_site_general": ["lower extremity"]})
    assert table_records(isic, ["ISIC_1"], "meta.csv") == [{"age": 45.0, "sex": "female", "site": "lower extremity"}]


def test_metadata_dropout_at_rate_one_is_no_metadata_and_at_zero_changes_nothing() -> None:
    clinical = torch.as_tensor(encode_records([{"age": 70, "sex": "male", "site": "face"}] * 6, SPEC))
    gen = torch.Generator().manual_seed(0)
    dropped = drop_fields(clinical, SPEC, 1.0, gen)
    torch.testing.assert_close(dropped, torch.as_tensor(unknown_rows(6, SPEC)))
    assert drop_fields(clinical, SPEC, 0.0, gen) is clinical
    half = drop_fields(clinical.repeat(200, 1), SPEC, 0.5, gen)
    assert 0.4 < float(half[:, 1].mean()) < 0.6  # the age flag: about half the rows
    for method in ("concat", "film"):
        torch.manual_seed(1)
        model = build_model(3, "none", "resnet18", make_spec(method)).eval()
        x = torch.randn(6, 3, SIZE, SIZE)
        torch.testing.assert_close(model(x, dropped), model(x))  # dropped everything == given nothing


@pytest.fixture(scope="module")
def ham(tmp_path_factory):
    root = generate_demo(tmp_path_factory.mktemp("meta") / "data", n_lesions=24, image_size=SIZE, seed=5)
    return root, load_dataset(root, SIZE, SplitOptions(0.2, 0.2), progress=False, masks=False)


@pytest.fixture(scope="module")
def trained(ham, tmp_path_factory):
    """One epoch of a film model on the demo data (which has age, sex and localization columns)."""
    out = tmp_path_factory.mktemp("meta-run")
    cfg = TrainConfig(image_size=SIZE, epochs=1, batch_size=16, pretrained="none", warmup_epochs=0.0,
                      metadata="film", metadata_dropout=0.2, eval_batch_size=64)
    train(cfg, ham[1], out, options=QUIET)
    return out / "best.pt"


def test_a_model_with_clinical_fields_round_trips_through_its_file(ham, trained, caplog) -> None:
    data = ham[1]
    raw = torch.load(trained, weights_only=True)
    assert raw["arch"] == "resnet18" and raw["metadata"] == make_spec("film")
    loaded = load_for_inference(trained, "cpu")
    assert loaded.fusion == make_spec("film")
    idx = data.indices("val")
    encoded = loaded.encode_dataset(data, idx)
    np.testing.assert_array_equal(encoded, encode_dataset(data, make_spec("film"))[idx])
    with torch.no_grad():
        logits = loaded.model(torch.as_tensor(data.images[idx]).float().sub(127.5).div(64),  # any input
                              torch.as_tensor(encoded))
    assert logits.shape == (len(idx), len(data.class_names))
    with_meta = loaded.predict(data.images[idx], clinical=encoded, calibrated=False)
    unknown = loaded.predict(data.images[idx], clinical=unknown_rows(len(idx), loaded.fusion),
                             calibrated=False)
    with caplog.at_level("WARNING"):
        without = loaded.predict(data.images[idx], calibrated=False)
    assert "treated as unknown" in caplog.text
    np.testing.assert_allclose(without, unknown, atol=1e-6)      # no metadata: every field unknown
    assert not np.allclose(with_meta, without, atol=1e-6)        # and the metadata does reach the model
    tta = loaded.predict(data.images[idx], clinical=encoded, tta=True, calibrated=False)
    np.testing.assert_allclose(tta.sum(1), 1.0, atol=1e-5)


def test_predict_takes_age_sex_site_and_refuses_bad_ones(ham, trained, tmp_path, capsys) -> None:
    from core.predict import main

    import json

    from core.data.image_cache import decode_image

    images = sorted((ham[0] / "HAM10000_images_part_1").glob("*.jpg"))[:2]
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [str(trained), *map(str, images), "--json", "--no-calibration", "--age", "55", "--sex",
                       "female", "--site", "back"])
    assert exit_.value.code in (0, None)
    rows = json.loads(capsys.readouterr().out)
    loaded = load_for_inference(trained, "cpu")
    pixels = np.stack([decode_image(path, SIZE) for path in images])
    expected = loaded.predict(pixels, calibrated=False,
                              clinical=loaded.encode([{"age": 55, "sex": "female", "site": "back"}] * 2))
    got = np.array([[row["probabilities"][c] for c in loaded.class_names] for row in rows])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [str(trained), str(images[0]), "--age", "150"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("error: --age: clinical field 'age' = '150': out of range")


def test_a_layout_without_metadata_is_a_one_line_error(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "folders", ["a", "b"], per_class=8)
    data = load_dataset(root, SIZE, SplitOptions(0.25, 0.25), progress=False, masks=False)
    cfg = TrainConfig(image_size=SIZE, epochs=1, batch_size=4, pretrained="none", metadata="concat")
    with pytest.raises(UserError, match=r"the imagefolder layout carries no metadata .* use metadata=none") as err:
        train(cfg, data, tmp_path / "run", options=QUIET)
    assert "\n" not in str(err.value)


def test_a_missing_metadata_column_fails_the_run_naming_it(ham, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(ham[0], root)
    csv = root / "HAM10000_metadata.csv"
    table = pd.read_csv(csv, dtype=str, keep_default_na=False).drop(columns=["localization"])
    table.to_csv(csv, index=False)
    data = load_dataset(root, SIZE, SplitOptions(0.2, 0.2), progress=False, masks=False)
    cfg = TrainConfig(image_size=SIZE, epochs=1, batch_size=16, pretrained="none", metadata="concat")
    with pytest.raises(UserError, match="metadata column 'localization' missing"):
        train(cfg, data, tmp_path / "run", options=QUIET)


def test_isic_2018_with_its_metadata_csv_is_encoded(tmp_path: Path) -> None:
    from tests.data_fixtures import make_isic

    root = make_isic(tmp_path / "isic", ["nv", "mel", "bkl"])
    (root / "ISIC2018_Task3_Training_Metadata.csv").write_text(
        "image,lesion_id,age_approx,sex,anatom_site_general\n"
        "ISIC_0000000,L1,45,female,posterior torso\nISIC_0000001,L2,,male,lower extremity\n"
        "ISIC_0000002,L3,70,,head/neck\n")
    from core.data.layouts import read_layout

    listing = read_layout(root)  # the label table, with the metadata CSV's columns beside it
    assert listing.layout == "isic2018"
    rows = encode_dataset(listing, SPEC)
    expected = encode_records([{"age": 45, "sex": "female", "site": "back"}, {"sex": "male", "site": "lower extremity"},
                               {"age": 70}], SPEC)
    np.testing.assert_array_equal(rows, expected)


def test_gradcam_and_evaluate_work_for_a_model_with_clinical_fields(ham, trained, tmp_path, caplog, monkeypatch) -> None:
    import json

    import core.explain.gradcam
    from core.evaluate import main
    from core.explain.gradcam import gradcam_maps

    loaded = load_for_inference(trained, "cpu")
    maps = gradcam_maps(loaded.model, ham[1].images[:2], [0, 1], method="gradcam")
    assert maps.shape == (2, SIZE, SIZE) and np.isfinite(maps).all()
    given = []  # the metadata the evaluation's Grad-CAM explains with: the images' own, not all unknown
    monkeypatch.setattr(core.explain.gradcam, "gradcam_maps", lambda *a, **k: given.append(k["clinical"]) or gradcam_maps(*a, **k))
    with caplog.at_level("WARNING"), pytest.raises(SystemExit) as exit_:
        run_cli(main, [str(trained), "--data", str(ham[0]), "--out", str(tmp_path / "eval"), "--gallery", "1",
                       "--bootstrap", "0", "--no-calibration"])
    assert exit_.value.code in (0, None) and "treated as unknown" not in caplog.text
    assert len(given) == 1 and given[0].shape[1] == loaded.fusion["width"]
    assert not (given[0] == unknown_rows(len(given[0]), loaded.fusion)).all()
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    test = ham[1].indices("test")
    probs = loaded.predict(ham[1].images[test], clinical=loaded.encode_dataset(ham[1], test), calibrated=False)
    accuracy = float((probs.argmax(1) == ham[1].labels[test]).mean())
    assert doc["test_accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize("method", ["gradcam", "guided"])
def test_gradcam_of_a_model_with_clinical_fields_uses_each_images_own(method: str) -> None:
    """The maps are Captum's for the model as it predicted (image and metadata), not with the metadata unknown."""
    from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam

    from core.model.forward import normalize
    from core.explain.gradcam import gradcam_maps

    torch.manual_seed(0)
    model = build_model(3, "none", fusion=make_spec("film")).eval()
    torch.nn.init.normal_(model.film.weight, std=0.5)  # FiLM starts as the identity: make the metadata matter
    images = np.random.default_rng(1).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    clinical = encode_records([{"age": 80, "sex": "male", "site": "face"}, {"age": 5, "sex": "female", "site": "foot"}],
                          model.spec)
    ours = gradcam_maps(model, images, [0, 2], layer="layer3", method=method, clinical=clinical)
    x, target, extra = normalize(torch.as_tensor(images)).requires_grad_(), torch.tensor([0, 2]), (torch.as_tensor(clinical),)
    if method == "guided":
        heat = GuidedGradCam(model, model.backbone.layer3).attribute(x, target=target, additional_forward_args=extra)
        heat = heat.detach().abs().sum(1).numpy()
    else:
        cam = LayerGradCam(model, model.backbone.layer3).attribute(x, target=target, additional_forward_args=extra,
                                                                 relu_attributions=True)
        heat = LayerAttribution.interpolate(cam, (64, 64), interpolate_mode="bilinear")[:, 0].detach().numpy()
    peak = heat.reshape(2, -1).max(1)
    np.testing.assert_allclose(ours, heat / np.where(peak > 0, peak, 1)[:, None, None], atol=1e-5)
    unknown = gradcam_maps(model, images, [0, 2], layer="layer3", method=method)  # every field unknown
    assert np.abs(ours - unknown).max() > 1e-3
    with pytest.raises(ValueError, match="2 images but 1 clinical-field rows"):
        gradcam_maps(model, images, [0, 2], method=method, clinical=clinical[:1])
