"""core.final_train from a tiny sweep's best.json, and the best.json checks (core.best_file).

The best.json is written here, in the documented schema, from a one-epoch core.train run on tiny
generated data (48 px), so nothing depends on Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.best_file import check_data, read_best
from core.config import TrainConfig
from core.errors import UserError, run_cli
from core.evaluation.evaluation_file import source_data_of, training_of

SIZE = 48
FINAL_EPOCHS = 2


def _best_document(cfg: TrainConfig, data, value: float) -> dict:
    return {"format": "lesion-sweep/best", "version": 1, "config": cfg.to_dict(),
            "metric": {"name": "val_balanced_accuracy", "value": value, "mode": "max"},
            "trial_id": "trial_0001",
            "data": {"path": data.root, "fingerprint": data.fingerprint, "layout": data.layout},
            "splits_file": "splits.csv", "checkpoint": "trials/trial_0001/best.pt",
            "code_version": {"package": "0.1.0", "git_commit": None, "git_dirty": None},
            "created": "2025-06-01T12:00:00+00:00"}


@pytest.fixture(scope="module")
def sweep(module_tmp: Path) -> Path:
    """A sweep folder holding best.json, splits.csv and the trial, as sweep/ leaves it."""
    from core.data.dataset import load_for_config
    from core.data.demo_data import generate_demo
    from core.train import RunOptions, train

    base = module_tmp
    root = generate_demo(base / "data", n_lesions=30, image_size=SIZE, seed=0)
    cfg = TrainConfig(epochs=1, image_size=SIZE, pretrained="none", batch_size=8, warmup_epochs=0.0, lr=2e-3,
                      crop_scale_min=1.0, color_jitter=0.0, device="cpu")
    data = load_for_config(root, cfg, progress=False)
    folder = base / "sweep"
    result = train(cfg, data, folder / "trials" / "trial_0001", options=RunOptions(progress=False, tensorboard=False))
    shutil.copy(folder / "trials" / "trial_0001" / "splits.csv", folder / "splits.csv")
    best = _best_document(cfg, data, result.best_metrics["val_balanced_accuracy"])
    (folder / "best.json").write_text(json.dumps(best, indent=2))
    return folder


@pytest.fixture(scope="module")
def final(sweep: Path):
    from core.final_train import FinalOptions, final_train

    from core.evaluation.sections import SectionOptions

    return final_train(sweep / "best.json", FinalOptions(epochs=FINAL_EPOCHS, overrides=("lr=3e-3",),
                                                         gallery_per_class=1, progress=False,
                                                         evaluation=SectionOptions(tta=True, resamples=200)))


def _is_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.load()  # decodes the whole file
        return image.size


def test_final_training_writes_every_output(sweep: Path, final) -> None:
    out = sweep / "final"
    assert final.out_dir == out and final.report == out / "report.md"
    splits = pd.read_csv(sweep / "splits.csv")
    n_test = int((splits["split"] == "test").sum())

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_auc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["test_loss"] > 0
    assert metrics["n_images"] == n_test
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.shape == (7, 7) and confusion.sum() == n_test
    assert np.isclose(np.trace(confusion) / n_test, metrics["test_accuracy"])
    per_class = metrics["per_class"]
    assert sorted(per_class) == sorted(metrics["class_names"])
    assert sum(row["support"] for row in per_class.values()) == n_test
    assert all(0 <= row[k] <= 1 for row in per_class.values() for k in ("precision", "recall", "f1"))
    assert metrics["format"] == "lesion-sweep/evaluation" and metrics["source"]["split"] == "test"
    training = metrics["training"]
    assert training["train_splits"] == ["train"] and training["epochs_run"] == FINAL_EPOCHS
    assert 1 <= training["chosen_epoch"] <= FINAL_EPOCHS and training["tuned_epochs"] == 1
    # Read back through the typed readers the report page and the server use: the same figures.
    record, source = training_of(metrics), source_data_of(metrics)
    assert record is not None and record.to_dict() == training and not record.trained_on_val
    assert source is not None and list(source.class_names) == metrics["class_names"] and source.layout == "demo"

    # The sweep's split is reused exactly, and --epochs / --set reach the config written beside the model.
    assert pd.read_csv(out / "splits.csv").equals(splits)
    cfg = TrainConfig.load(out / "config.json")
    assert cfg.epochs == FINAL_EPOCHS and cfg.lr == 3e-3 and cfg.batch_size == 8
    assert len(pd.read_csv(out / "metrics.csv")) == FINAL_EPOCHS
    assert list(out.glob("events.out.tfevents.*")), "TensorBoard scalars"

    payload = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert payload["format"] == "lesion-sweep/model" and payload["epoch"] == training["chosen_epoch"]
    assert payload["class_names"] == metrics["class_names"] and payload["config"] == cfg.to_dict()
    assert payload["metrics"]["test_accuracy"] == metrics["test_accuracy"]

    for name in ("training_curves.png", "confusion_matrix.png", "roc_curves.png"):
        width, height = _is_png(out / name)
        assert width > 300 and height > 200, name
    galleries = sorted(out.glob("gradcam_*.png"))
    assert len(galleries) == 7  # the tiny split has every class in test
    for path in galleries:
        _is_png(path)
    overlays = sorted((out / "gradcam").rglob("*.png"))
    assert len(overlays) == 7  # one example per class
    assert all(_is_png(path)[0] >= 224 for path in overlays)

    gradcam = metrics["gradcam"]  # the demo data has lesion masks: every test image's map is scored
    assert gradcam["method"] == "GuidedGradCam" and gradcam["layer"] == "layer4"
    assert gradcam["lesion_masks"]["n_images"] == n_test

    report = (out / "report.md").read_text()
    low, high = metrics["intervals"]["test_balanced_accuracy"]
    assert f"| {metrics['test_balanced_accuracy']:.3f} [{low:.2f}, {high:.2f}] |" in report
    assert "GuidedGradCam" in report and "**layer4**" in report and "centred Gaussian" in report
    assert "| mel |" in report and "trial_0001" in report
    for link in ("training_curves.png", "confusion_matrix.png", "roc_curves.png", "gradcam_mel.png",
                 "reliability_diagram.png"):
        assert f"]({link})" in report and (out / link).is_file()
    for title in ("## Image level and lesion level", "## Calibration (TTA)", "## Test-time augmentation",
                  "## Operating points: mel vs the rest", "## Subgroup: sex"):
        assert title in report, title
    # When not to trust the answer: the statistics fitted on val in model.pt, both sections, the figure.
    assert set(payload["ood"]["thresholds"]) == {"mahalanobis", "max_softmax", "energy"}
    assert payload["ood"]["fitted_on"] == "val" and payload["abstention"]["coverage"] == 0.9
    ood = metrics["ood"]
    assert ood["far_out"]["natural_photos"]["n"] >= 50 and ood["far_out"]["synthetic"]["n"] == 32
    assert set(ood["shifted_lesions"]) == {"blur", "jpeg_q10", "colour_cast", "rotated"}
    assert all(0 <= row["auroc"] <= 1 and 0 <= row["fpr_at_95"] <= 1
               for group in [*ood["far_out"].values(), *ood["shifted_lesions"].values()]
               for row in group["scores"].values())
    coverage = metrics["abstention"]
    assert coverage["at"]["1.00"]["balanced_accuracy"] == pytest.approx(metrics["test_balanced_accuracy"])
    assert coverage["at"]["0.80"]["n"] == math.ceil(0.8 * n_test) and 0 <= coverage["aurc"] <= 1
    assert "## Images unlike the training data" in report and "## Abstention: answering only the surest" in report
    assert "](risk_coverage.png)" in report and _is_png(out / "risk_coverage.png")[0] > 300
    page = (out / "report.html").read_text()  # the same Grad-CAM scores as report.md, as an HTML table
    assert "GuidedGradCam" in page and "<strong>layer4</strong>" in page and "centred Gaussian" in page
    assert page.count("<table>") >= 4 and "| mel |" not in page
    assert f"{metrics['test_balanced_accuracy']:.3f} [{low:.2f}, {high:.2f}]" in page  # intervals, tables too
    assert "Calibration (TTA)</h2>" in page and "Operating points: mel vs the rest</h2>" in page


def test_boxes_are_scored_against_the_masks_with_what_val_and_train_chose(sweep: Path, final) -> None:
    """A model without the box head still localises: its Grad-CAM box (threshold chosen on val, stored in model.pt)
    beside the centre prior (the training split's mean mask box) and the whole image."""
    import torch

    out = final.out_dir
    stored = torch.load(out / "model.pt", weights_only=True)["boxes"]
    assert stored["cam_fraction_chosen_on"] == "val" and 0 < stored["cam_fraction"] < 1
    x0, y0, x1, y1 = stored["centre_prior"]
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    section = final.metrics["localisation"]
    assert set(section["boxes"]) == {"gradcam", "centre_prior", "whole_image"}   # no head: none of its box
    assert section["boxes"]["gradcam"]["fraction"] == stored["cam_fraction"]
    assert section["boxes"]["centre_prior"]["box"] == stored["centre_prior"]
    assert 0 <= section["max_box_acc"]["max_box_acc"] <= 1
    assert _is_png(out / "boxes.png") and "](boxes.png)" in (out / "report.md").read_text()
    assert "Where is the lesion" in (out / "report.md").read_text()


def test_calibration_and_thresholds_come_from_val_and_are_stored_in_the_model(sweep: Path, final) -> None:
    from core.model.calibration import apply_temperature, fit_temperature
    from core.data.dataset import SplitOptions, load_dataset
    from core.model.loading import load_for_inference
    from core.evaluation.operating_points import choose_thresholds

    loaded = load_for_inference(final.out_dir / "model.pt", "cpu")
    data = load_dataset(read_best(sweep / "best.json").data_path, SIZE, SplitOptions(splits_file=sweep / "splits.csv"),
                        progress=False)
    val = data.indices("val")
    mel = data.labels[val] == data.class_names.index("mel")
    stored = loaded.header["calibration"]
    assert stored["fitted_on"] == "val" and stored["n_images"] == len(val)
    for tta, view in ((False, "single"), (True, "tta")):
        raw = loaded.predict(data.images[val], tta=tta, calibrated=False)
        assert stored["temperature"][view] == pytest.approx(fit_temperature(data.labels[val], raw), rel=1e-4)
        calibrated = apply_temperature(raw, stored["temperature"][view])
        np.testing.assert_allclose(loaded.predict(data.images[val], tta=tta), calibrated, atol=1e-9)
        points = loaded.header["operating_points"]["modes"][f"{view}/calibrated"]["points"]
        chosen = choose_thresholds(mel, calibrated[:, data.class_names.index("mel")])
        assert [p["threshold"] for p in points] == pytest.approx([p["threshold"] for p in chosen])

    metrics = json.loads((final.out_dir / "metrics.json").read_text())
    assert metrics["prediction"] == {"view": "tta", "calibrated": True, "temperature": stored["temperature"]["tta"],
                                     "positive_class": "mel"}
    calibration = metrics["calibration"]
    assert calibration["temperature"] == stored["temperature"]["tta"] and calibration["fitted_on"] == "val"
    for key in ("ece", "brier", "nll"):
        assert calibration["before"][key] >= 0 and calibration["after"][key] >= 0
    assert metrics["test_loss"] == pytest.approx(calibration["after"]["nll"])
    # The test report applies the val thresholds and says what they gave on val.
    operating = metrics["operating_points"]
    assert operating["mode"] == "tta/calibrated" and operating["chosen_on"] == "val"
    stored_points = loaded.header["operating_points"]["modes"]["tta/calibrated"]["points"]
    assert [p["threshold"] for p in operating["points"]] == [p["threshold"] for p in stored_points]
    assert [p["val_sensitivity"] for p in operating["points"]] == [p["sensitivity"] for p in stored_points]
    # TTA against no TTA, lesion level, intervals, subgroups.
    assert metrics["tta"]["with"]["test_accuracy"] == metrics["test_accuracy"]
    assert metrics["lesion_level"]["n_lesions"] < metrics["n_images"]
    assert metrics["bootstrap"]["unit"] == "lesion" and metrics["bootstrap"]["resamples"] == 200
    assert set(metrics["subgroups"]) == {"age", "sex", "localization"}  # dx_type is 'synthetic' only


def test_positive_class_that_is_not_a_class_fails_before_training(sweep: Path, tmp_path: Path, capsys) -> None:
    err = _cli_error([str(sweep / "best.json"), "--positive-class", "melanoma", "--out", str(tmp_path / "o")], capsys)
    assert "--positive-class melanoma: not a class" in err
    assert not (tmp_path / "o" / "last.pt").exists()


def test_gradcam_of_the_trained_model_is_image_sized_and_not_constant(sweep: Path, final) -> None:
    from core.data.dataset import SplitOptions, load_dataset
    from core.explain.gradcam import gradcam_maps
    from core.model.networks import load_model_file
    from core.model.inference import predict_probs

    model, header = load_model_file(final.out_dir / "model.pt")
    data = load_dataset(read_best(sweep / "best.json").data_path, header["image_size"],
                        SplitOptions(splits_file=sweep / "splits.csv"), progress=False)
    images = data.images[data.indices("test")][:6]
    pred = predict_probs(model, images).argmax(1)
    maps = gradcam_maps(model, images, pred.tolist())
    assert maps.shape == (len(images), SIZE, SIZE)
    assert np.all((maps >= 0) & (maps <= 1))
    assert all(m.max() - m.min() > 0.05 for m in maps), [float(m.max() - m.min()) for m in maps]


def test_train_on_val_keeps_the_last_epoch(sweep: Path, tmp_path: Path) -> None:
    from core.final_train import FinalOptions, final_train

    options = FinalOptions(epochs=2, out_dir=tmp_path / "trainval", train_on_val=True, gallery_per_class=0,
                           progress=False)
    result = final_train(sweep / "best.json", options)
    training = result.metrics["training"]
    assert training["train_splits"] == ["train", "val"] and training["chosen_by"] == "last epoch"
    assert training["chosen_epoch"] == training["epochs_run"] == 2
    assert not list((tmp_path / "trainval").glob("gradcam_*.png"))
    # Nothing held out: no temperature, no thresholds (never fitted on training images), and the report says so.
    assert "trained on train+val" in result.metrics["calibration"]["skipped"]
    assert "after" not in result.metrics["calibration"] and "points" not in result.metrics["operating_points"]
    assert result.metrics["prediction"]["calibrated"] is False
    header = torch.load(tmp_path / "trainval" / "model.pt", weights_only=True)
    assert "skipped" in header["calibration"] and "temperature" not in header["calibration"]
    assert "Not calibrated: trained on train+val" in (tmp_path / "trainval" / "report.md").read_text()
    # A second run in the same folder evaluates the finished training again instead of training more.
    again = final_train(sweep / "best.json", options)
    assert again.metrics["test_accuracy"] == result.metrics["test_accuracy"]
    # ... and will not resume it as a run on the train split alone.
    with pytest.raises(UserError, match="train_splits"):
        final_train(sweep / "best.json", dataclasses.replace(options, train_on_val=False))


def test_help_lists_the_options(capsys: pytest.CaptureFixture) -> None:
    from core.final_train import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--epochs", "--set", "--out", "--train-on-val", "BEST_JSON", "select_metric", "--tta",
                   "--positive-class", "--bootstrap"):
        assert option in text


# --- bad input: one line naming the problem, exit status 2 ---------------------------------------------


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    from core.final_train import main

    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def _edited(sweep: Path, tmp_path: Path, edit) -> Path:
    document = json.loads((sweep / "best.json").read_text())
    edit(document)
    shutil.copy(sweep / "splits.csv", tmp_path / "splits.csv")
    path = tmp_path / "best.json"
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("metric"), "field 'metric' is missing"),
    (lambda d: d["data"].pop("fingerprint"), "field 'data.fingerprint' is missing"),
    (lambda d: d.__setitem__("splits_file", 3), "field 'splits_file' is int 3, expected a string"),
    (lambda d: d["metric"].__setitem__("value", "high"), "field 'metric.value' is str"),
    (lambda d: d["metric"].__setitem__("mode", "up"), "field 'metric.mode' is 'up'"),
    (lambda d: d.__setitem__("format", "something-else"), "not a sweep's best.json"),
    (lambda d: d.__setitem__("version", 7), "field 'version' is 7"),
    (lambda d: d["config"].__setitem__("learning_rate", 0.1), "unknown config key 'learning_rate'"),
    (lambda d: d["config"].pop("lr"), "field 'config' lacks key 'lr'"),
    (lambda d: d["config"].__setitem__("lr", "fast"), "config key 'lr'"),
    (lambda d: d.__setitem__("created", "yesterday"), "field 'created'"),
])
def test_malformed_best_json_is_one_line_naming_the_field(sweep: Path, tmp_path: Path, capsys, edit,
                                                          message: str) -> None:
    path = _edited(sweep, tmp_path, edit)
    err = _cli_error([str(path)], capsys)
    assert str(path) in err and message in err


def test_unreadable_or_missing_best_json(tmp_path: Path, capsys) -> None:
    assert "no such file" in _cli_error([str(tmp_path / "nope.json")], capsys)
    (tmp_path / "best.json").write_text("{not json")
    assert "not readable JSON" in _cli_error([str(tmp_path / "best.json")], capsys)
    (tmp_path / "best.json").write_text("[1, 2]")
    assert "expected a JSON object, got list" in _cli_error([str(tmp_path / "best.json")], capsys)


def test_dataset_gone_or_changed(sweep: Path, tmp_path: Path, capsys) -> None:
    from core.data.dataset import dataset_fingerprint

    copy = tmp_path / "data-copy"
    shutil.copytree(read_best(sweep / "best.json").data_path, copy)

    def point_to_copy(d: dict) -> None:
        d["data"]["path"] = str(copy)
        d["data"]["fingerprint"] = dataset_fingerprint(copy)

    path = _edited(sweep, tmp_path, point_to_copy)
    check_data(read_best(path))  # the copy as it is passes
    image = next(copy.rglob("*.jpg"))
    image.write_bytes(image.read_bytes() + b"\0")
    err = _cli_error([str(path)], capsys)
    assert "changed since the sweep" in err and str(copy) in err
    shutil.rmtree(copy)
    err = _cli_error([str(path)], capsys)
    assert "is gone" in err and str(copy) in err


def test_missing_split_file_and_bad_overrides(sweep: Path, tmp_path: Path, capsys) -> None:
    path = _edited(sweep, tmp_path, lambda d: d.__setitem__("splits_file", "elsewhere/splits.csv"))
    assert "split file" in _cli_error([str(path)], capsys)
    assert "unknown config key 'lrr'" in _cli_error([str(sweep / "best.json"), "--set", "lrr=1"], capsys)
    assert "config key 'epochs'" in _cli_error([str(sweep / "best.json"), "--epochs", "0"], capsys)


def test_epochs_default_to_the_tuned_length(sweep: Path, tmp_path: Path, caplog) -> None:
    from core.final_train import FinalOptions, final_train

    with caplog.at_level("WARNING", logger="core.final_train"):
        result = final_train(sweep / "best.json", FinalOptions(out_dir=tmp_path / "default", gallery_per_class=0,
                                                               progress=False))
    assert result.metrics["training"]["epochs"] == result.metrics["training"]["tuned_epochs"] == 1
    assert "tuned with" not in caplog.text


@pytest.mark.parametrize("epochs, tuned, warned", [(50, 50, False), (50, 34, False), (50, 33, True),
                                                   (20, 50, True), (10, 6, True), (9, 6, False)])
def test_epoch_mismatch_is_said_only_beyond_one_and_a_half_times(epochs, tuned, warned, caplog) -> None:
    from core.final_train import _warn_epoch_mismatch

    with caplog.at_level("WARNING", logger="core.final_train"):
        _warn_epoch_mismatch(epochs, tuned)
    assert ("tuned with" in caplog.text) == warned
    assert len(caplog.records) == int(warned)


def test_ema_weights_are_the_ones_in_model_pt(sweep: Path, tmp_path: Path) -> None:
    """With ema_decay the final model.pt (and best.pt) is the EMA of the weights, not the raw last step's."""
    from core.final_train import FinalOptions, final_train
    from core.model.networks import load_model_file

    result = final_train(sweep / "best.json", FinalOptions(overrides=("ema_decay=0.9",), out_dir=tmp_path / "ema",
                                                           gallery_per_class=0, progress=False))
    assert result.metrics["training"]["chosen_epoch"] == 1  # the only epoch: the EMA in last.pt is the chosen one
    state = torch.load(result.out_dir / "last.pt", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    for name in ("model.pt", "best.pt"):
        saved = load_model_file(result.out_dir / name)[0].state_dict()
        assert all(torch.equal(saved[k], ema[k]) for k in saved), name
        assert not all(torch.equal(saved[k], state["model"][k]) for k in saved if saved[k].is_floating_point()), name
