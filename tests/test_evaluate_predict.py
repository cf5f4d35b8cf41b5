"""core.evaluate and core.predict end to end: as commands (subprocesses) and in-process for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import TrainConfig
from core.errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(module_tmp: Path) -> dict[str, Path]:
    """Tiny demo data and a model file of this project (weights need no training for these checks)."""
    from core.data.demo_data import generate_demo
    from core.model.networks import build_model, save_model_file

    base = module_tmp
    data = generate_demo(base / "data", n_lesions=21, image_size=SIZE, seed=1)
    torch.manual_seed(0)
    model = build_model(7, "none")
    cfg = TrainConfig(image_size=SIZE, pretrained="none")
    classes = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    save_model_file(base / "model.pt", model, classes, cfg.to_dict(), {"epoch": 3, "metrics": {}})
    return {"base": base, "data": data, "model": base / "model.pt"}


def _image_folder(root: Path, source: Path, classes: dict[str, int]) -> Path:
    """An ImageFolder dataset: ``count`` images per class folder, taken from the demo images."""
    jpgs = sorted(source.rglob("*.jpg"))
    k = 0
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for _ in range(count):
            Image.open(jpgs[k]).save(root / name / f"{jpgs[k].stem}.png")
            k += 1
    return root


def _one_line_error(returncode: int, stderr: str) -> str:
    """Exit status 2 and one ``error:`` line (progress bars may come before it), no traceback."""
    assert returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.endswith(errors[0] + "\n") and "Traceback" not in stderr, stderr
    return errors[0]


def _cli(main, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run a command's main as ``python -m`` does (through run_cli); returns its one error line."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    return _one_line_error(exit_.value.code, capsys.readouterr().err)


def test_evaluate_command_maps_a_subset_of_classes_by_name(setup: dict[str, Path], tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "external", setup["data"], {"mel": 3, "nv": 4})
    out = tmp_path / "out"
    result = _command("core.evaluate", str(setup["model"]), "--data", str(folder), "--out", str(out),
                      "--split", "all", "--gallery", "1")
    assert result.returncode == 0, result.stderr
    assert f"report: {out / 'report.md'}" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 7 and metrics["source"]["split"] == "all" and metrics["class_names"][4:6] == ["mel", "nv"]
    support = {name: row["support"] for name, row in metrics["per_class"].items()}
    assert support == {"akiec": 0, "bcc": 0, "bkl": 0, "df": 0, "mel": 3, "nv": 4, "vasc": 0}
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion[4].sum() == 3 and confusion[5].sum() == 4 and confusion.sum() == 7
    for key in ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_auc"):
        assert 0 <= metrics[key] <= 1
    assert metrics["test_loss"] > 0
    for name in ("confusion_matrix.png", "roc_curves.png", "gradcam_mel.png", "gradcam_nv.png", "report.md",
                 "report.html"):
        assert (out / name).is_file(), name
    assert sorted(p.parent.name for p in (out / "gradcam").rglob("*.png")) == ["mel", "nv"]


def test_evaluate_a_whole_dataset(setup: dict[str, Path], tmp_path: Path) -> None:
    from core.evaluate import main

    assert main([str(setup["model"]), "--data", str(setup["data"]), "--out", str(tmp_path), "--split", "all",
                 "--gallery", "0"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    n_images = len(list(setup["data"].rglob("*.jpg")))
    assert metrics["n_images"] == n_images and np.array(metrics["confusion_matrix"]).sum() == n_images
    assert sum(row["support"] for row in metrics["per_class"].values()) == n_images
    assert not list(tmp_path.glob("gradcam*"))


def test_evaluate_test_split_uses_the_models_split_settings(setup: dict[str, Path], tmp_path: Path) -> None:
    from core.data.dataset import load_dataset
    from core.evaluate import main

    main([str(setup["model"]), "--data", str(setup["data"]), "--out", str(tmp_path), "--gallery", "0"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    expected = load_dataset(setup["data"], SIZE, progress=False).indices("test")
    assert metrics["source"]["split"] == "test" and metrics["n_images"] == len(expected) > 0


def test_evaluate_rejects_unknown_classes(setup: dict[str, Path], tmp_path: Path, capsys) -> None:
    from core.evaluate import main

    folder = _image_folder(tmp_path / "other", setup["data"], {"mel": 2, "psoriasis": 2})
    err = _cli(main, [str(setup["model"]), "--data", str(folder), "--out", str(tmp_path / "out"), "--split", "all"],
               capsys)
    assert "classes the model does not know: psoriasis" in err and str(folder) in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_evaluate_rejects_a_file_that_is_not_a_model(setup: dict[str, Path], tmp_path: Path, capsys) -> None:
    from core.evaluate import main

    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    for path, message in ((tmp_path / "other.pt", "not a lesion-sweep model file"),
                          (tmp_path / "text.pt", "damaged, not a readable PyTorch file"),
                          (tmp_path / "absent.pt", "no such weights file")):
        err = _cli(main, [str(path), "--data", str(setup["data"]), "--out", str(tmp_path / "o")], capsys)
        assert message in err and str(path) in err


def test_predict_command_json_and_gradcam(setup: dict[str, Path], tmp_path: Path) -> None:
    from core.data.dataset import load_dataset
    from core.model.networks import load_model_file
    from core.model.inference import predict_probs

    images = sorted(setup["data"].rglob("*.jpg"))[:3]
    result = _command("core.predict", str(setup["model"]), *map(str, images), "--json",
                      "--gradcam", str(tmp_path / "cams"))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["image"] for row in rows] == [str(p) for p in images]
    for row in rows:
        probs = row["probabilities"]
        assert list(probs) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
        assert abs(sum(probs.values()) - 1) < 1e-5
        assert row["prediction"] == max(probs, key=probs.get) and row["confidence"] == max(probs.values())
    # Same preprocessing as training: the probabilities equal those of the dataset's decoded images.
    data = load_dataset(setup["data"], SIZE, progress=False)
    model, _ = load_model_file(setup["model"])
    index = [list(data.image_ids).index(p.stem) for p in images]
    expected = predict_probs(model, data.images[index])
    got = np.array([list(row["probabilities"].values()) for row in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for path in images:
        with Image.open(tmp_path / "cams" / f"{path.stem}_gradcam.png") as overlay:
            assert overlay.size == (224, 224)


def test_predict_table_and_bad_images(setup: dict[str, Path], tmp_path: Path, capsys) -> None:
    from core.predict import main, overlay_names

    image = sorted(setup["data"].rglob("*.jpg"))[0]
    assert main([str(setup["model"]), str(image)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["image", "prediction", "conf"] and table[2].startswith(str(image))
    assert len(table) == 4 and table[3].startswith("no out-of-distribution check in this model file")

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(image.read_bytes()[:200])  # a truncated JPEG
    result = _command("core.predict", str(setup["model"]), str(image), str(broken))  # as a user runs it
    err = _one_line_error(result.returncode, result.stderr)
    assert str(broken) in err and "cannot read image" in err and not result.stdout
    with pytest.raises(UserError, match="missing.png"):
        main([str(setup["model"]), str(tmp_path / "missing.png")])
    assert overlay_names(["a/x.jpg", "b/x.png", "y.jpg"]) == ["x_gradcam.png", "x-2_gradcam.png", "y_gradcam.png"]


def test_an_older_model_file_without_the_check_and_fit_ood(setup: dict[str, Path], tmp_path: Path, capsys) -> None:
    from core.data.dataset import load_dataset
    from core.evaluate import main as evaluate
    from core.predict import main as predict
    from core.data.splits import write_splits

    image = str(sorted(setup["data"].rglob("*.jpg"))[0])
    assert predict([str(setup["model"]), image, "--json"]) == 0   # no statistics: it works and says so
    row = json.loads(capsys.readouterr().out)[0]
    assert row["ood"]["in_distribution"] is None and "no out-of-distribution check" in row["ood"]["note"]
    assert row["abstain"] == {**row["abstain"], "abstained": False, "reason": None, "threshold": None}
    evaluate([str(setup["model"]), "--data", str(setup["data"]), "--out", str(tmp_path / "plain"), "--gallery", "0",
              "--bootstrap", "0"])
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert plain["ood"]["skipped"].startswith("no out-of-distribution check in this model file")
    assert plain["abstention"]["rule"]["skipped"] and plain["abstention"]["at"]["1.00"]["n"] == plain["n_images"]

    err = _cli(evaluate, [str(setup["model"]), "--data", str(setup["data"]), "--out", str(tmp_path / "o"),
                          "--fit-ood"], capsys)
    assert "--fit-ood" in err and "splits.csv" in err
    write_splits(load_dataset(setup["data"], SIZE, progress=False), tmp_path / "splits.csv")
    out = tmp_path / "fitted"
    assert evaluate([str(setup["model"]), "--data", str(setup["data"]), "--out", str(out), "--gallery", "0",
                     "--bootstrap", "0", "--fit-ood", "--splits", str(tmp_path / "splits.csv")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ood"]["fitted_on"] == "val" and metrics["ood"]["far_out"]["synthetic"]["n"] == 32
    assert metrics["abstention"]["rule"]["coverage_asked"] == 0.9
    stored = torch.load(out / "model.pt", weights_only=True)   # the given file is left as it was
    assert "ood" in stored and "ood" not in torch.load(setup["model"], weights_only=True)
    capsys.readouterr()
    assert predict([str(out / "model.pt"), image, "--json", "--coverage", "0.5"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["ood"]["threshold"] == pytest.approx(stored["ood"]["thresholds"]["mahalanobis"])
    assert isinstance(row["ood"]["in_distribution"], bool) and row["abstain"]["coverage"] == 0.5


def test_help_of_both_commands(capsys) -> None:
    from core import evaluate, predict

    for module, options in ((evaluate, ("--data", "--out", "--split", "--gallery", "--tta", "--no-calibration",
                                        "--positive-class", "--bootstrap", "--bootstrap-seed")),
                            (predict, ("IMAGE", "--json", "--gradcam", "--tta", "--no-calibration"))):
        with pytest.raises(SystemExit) as exit_:
            module.main(["--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert all(option in text for option in options)


def test_evaluate_scores_gradcam_against_the_demo_masks(setup: dict[str, Path], tmp_path: Path) -> None:
    from core.evaluate import main

    assert main([str(setup["model"]), "--data", str(setup["data"]), "--out", str(tmp_path), "--gallery", "1",
                 "--gradcam-layer", "layer3"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    doc = metrics["gradcam"]
    assert doc["layer"] == "layer3" and doc["layer_chosen_by"] == "--gradcam-layer" and doc["map_side"] == 2
    lesions = doc["lesion_masks"]  # the demo's lesions are drawn, so every test image has a mask
    assert lesions["n_images"] == metrics["n_images"] and "centred_gaussian" in lesions["overall"]
    report = (tmp_path / "report.md").read_text()
    assert "**layer3**" in report and "centred Gaussian" in report and "| all |" in report
    assert "beat" in report


def test_predict_scores_maps_against_given_masks(setup: dict[str, Path], tmp_path: Path, capsys) -> None:
    from core.data.demo_data import MASKS_FOLDER
    from core.predict import main

    images = sorted(setup["data"].rglob("*.jpg"))[:3]
    masks = tmp_path / "masks"
    masks.mkdir()
    for image in images[:2]:  # the third has none
        shutil.copy(setup["data"] / MASKS_FOLDER / f"{image.stem}_segmentation.png", masks)
    assert main([str(setup["model"]), *map(str, images), "--json", "--gradcam", str(tmp_path / "cams"),
                 "--masks", str(masks)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(0 <= row["gradcam"]["energy_inside"] <= 1 for row in rows[:2])
    assert all(isinstance(row["gradcam"]["pointing_hit"], bool) for row in rows[:2])
    assert set(rows[2]["gradcam"]) == {"overlay", "box"} and Path(rows[2]["gradcam"]["overlay"]).is_file()
    assert main([str(setup["model"]), *map(str, images), "--gradcam", str(tmp_path / "cams"), "--masks",
                 str(masks)]) == 0
    assert "Grad-CAM against 2 lesion masks: energy inside" in capsys.readouterr().out
    with pytest.raises(UserError, match="--gradcam"):
        main([str(setup["model"]), str(images[0]), "--masks", str(masks)])
@pytest.fixture(scope="module")
def calibrated_model(setup: dict[str, Path]) -> Path:
    """The setup's model with a temperature per view and mel thresholds stored, as core.final_train stores them."""
    payload = torch.load(setup["model"], weights_only=True)
    payload["calibration"] = {"fitted_on": "val", "n_images": 10, "temperature": {"single": 2.0, "tta": 3.0}}
    points = [{"kind": "sensitivity_at_specificity", "target": 0.8, "threshold": 0.15, "sensitivity": 0.5,
               "specificity": 0.8}]
    payload["operating_points"] = {"positive_class": "mel", "chosen_on": "val", "n_positive": 4,
                                   "modes": {"single/calibrated": {"auc": 0.7, "points": points}}}
    path = setup["base"] / "calibrated.pt"
    torch.save(payload, path)
    return path


def test_evaluate_applies_the_stored_temperature_and_thresholds(setup, calibrated_model: Path, tmp_path: Path) -> None:
    from core.model.calibration import apply_temperature, negative_log_likelihood
    from core.data.dataset import load_dataset
    from core.evaluate import main
    from core.model.loading import load_for_inference

    data = load_dataset(setup["data"], SIZE, progress=False)
    raw = load_for_inference(calibrated_model, "cpu").predict(data.images, calibrated=False)
    for flags, temperature in (([], 2.0), (["--no-calibration"], None)):
        out = tmp_path / str(temperature)
        assert main([str(calibrated_model), "--data", str(setup["data"]), "--out", str(out), "--split", "all",
                     "--gallery", "0", "--bootstrap", "100", *flags]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        probs = raw if temperature is None else apply_temperature(raw, temperature)
        assert metrics["prediction"]["temperature"] == temperature
        assert metrics["test_loss"] == pytest.approx(negative_log_likelihood(data.labels, probs))
        assert metrics["calibration"]["before"]["nll"] == pytest.approx(negative_log_likelihood(data.labels, raw))
    # Calibrated: the thresholds stored in the model file (chosen on its val split) apply unchanged.
    point = json.loads((tmp_path / "2.0" / "metrics.json").read_text())["operating_points"]["points"][0]
    mel = data.labels == 4
    called = apply_temperature(raw, 2.0)[:, 4] >= 0.15
    assert point["threshold"] == 0.15 and point["val_sensitivity"] == 0.5
    assert point["sensitivity"] == pytest.approx(called[mel].mean())
    assert point["specificity"] == pytest.approx((~called[~mel]).mean())
    # Uncalibrated probabilities have no stored thresholds: the report says so instead of choosing any here.
    skipped = json.loads((tmp_path / "None" / "metrics.json").read_text())["operating_points"]
    assert "points" not in skipped and "single/raw" in skipped["skipped"]


def test_evaluate_with_tta_reports_both(setup, calibrated_model: Path, tmp_path: Path) -> None:
    from core.evaluate import main

    assert main([str(calibrated_model), "--data", str(setup["data"]), "--out", str(tmp_path), "--split", "all",
                 "--gallery", "0", "--bootstrap", "100", "--tta"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["prediction"]["view"] == "tta" and metrics["prediction"]["temperature"] == 3.0
    tta = metrics["tta"]
    assert tta["with"]["test_balanced_accuracy"] == metrics["test_balanced_accuracy"]
    assert tta["difference"]["test_balanced_accuracy"] == pytest.approx(
        tta["with"]["test_balanced_accuracy"] - tta["without"]["test_balanced_accuracy"])
    assert len(tta["difference"]["test_balanced_accuracy_ci"]) == 2
    assert "## Test-time augmentation" in (tmp_path / "report.md").read_text()


def test_predict_with_tta_and_without_calibration(setup, calibrated_model: Path, capsys) -> None:
    from core.model.calibration import apply_temperature
    from core.data.image_cache import decode_image
    from core.model.loading import load_for_inference
    from core.predict import main

    image = sorted(setup["data"].rglob("*.jpg"))[0]
    loaded = load_for_inference(calibrated_model, "cpu")
    pixels = decode_image(image, SIZE)[None]
    for flags, expected in (([], apply_temperature(loaded.predict(pixels, calibrated=False), 2.0)),
                            (["--tta"], apply_temperature(loaded.predict(pixels, tta=True, calibrated=False), 3.0)),
                            (["--tta", "--no-calibration"], loaded.predict(pixels, tta=True, calibrated=False))):
        assert main([str(calibrated_model), str(image), "--json", *flags]) == 0
        row = json.loads(capsys.readouterr().out)[0]
        np.testing.assert_allclose(list(row["probabilities"].values()), expected[0], atol=1e-6)


def test_positive_class_that_is_not_a_class_is_one_line(setup, tmp_path: Path, capsys) -> None:
    from core.evaluate import main

    err = _cli(main, [str(setup["model"]), "--data", str(setup["data"]), "--out", str(tmp_path / "out"),
                      "--positive-class", "melanoma"], capsys)
    assert "--positive-class melanoma: not a class of the model" in err and "akiec, bcc" in err
    assert not (tmp_path / "out").exists()


def test_the_commands_offer_the_grad_cam_methods_core_gradcam_has() -> None:
    """core/cli.py states the methods itself so that --help does not import Captum; they must stay the same."""
    from core.cli import GRADCAM_METHODS
    from core.explain.gradcam import DEFAULT_METHOD, METHODS

    assert GRADCAM_METHODS == METHODS and DEFAULT_METHOD in GRADCAM_METHODS
