"""The sweep's ensemble: greedy selection on hand-made probabilities, the ensemble model file, and the commands
(core.evaluate, core.predict, the server) on an ensemble of two tiny members, one with clinical fields."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import TrainConfig
from core.errors import UserError
from sweep.ensemble import STOP_NO_GAIN, STOP_SIZE, greedy_select

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def _p(*rows: float) -> np.ndarray:
    """Two-class probabilities from each image's probability of class 0."""
    return np.array([[r, 1 - r] for r in rows])


# Five images: x, z (class 0) only B gets right; y, w1, w2 (class 1) A gets right. A alone 3/5, B alone 2/5,
# A + B 4/5 (y lost), 2A + B 5/5: the best selection picks A, then B, then A again (with replacement).
LABELS = np.array([0, 0, 1, 1, 1])
A = _p(0.45, 0.40, 0.20, 0.10, 0.10)
B = _p(0.90, 0.75, 0.90, 0.60, 0.60)


def test_greedy_starts_from_the_best_run_and_picks_with_replacement() -> None:
    chosen = greedy_select([B, A], LABELS, "val_accuracy", max_size=5)
    assert chosen.steps[0] == (1, pytest.approx(0.6))                # A, the best alone, first
    assert [i for i, _ in chosen.steps] == [1, 0, 1]                 # then B, then A again
    assert [v for _, v in chosen.steps] == pytest.approx([0.6, 0.8, 1.0])
    assert chosen.counts.tolist() == [1, 2] and chosen.weights.tolist() == pytest.approx([1 / 3, 2 / 3])
    assert chosen.stopped == STOP_NO_GAIN and chosen.value == pytest.approx(1.0)  # nothing beats 5/5: stops at 3


def test_greedy_stops_at_the_size_and_keeps_the_earlier_of_equals() -> None:
    assert greedy_select([B, A], LABELS, "val_accuracy", max_size=2).counts.tolist() == [1, 1]
    alone = greedy_select([B, A], LABELS, "val_accuracy", max_size=1)
    assert alone.counts.tolist() == [0, 1] and alone.stopped == STOP_SIZE
    twins = greedy_select([A, A.copy(), B], LABELS, "val_accuracy", max_size=5)
    assert twins.counts.tolist() == [2, 0, 1]                         # the tie goes to the earlier run
    # a loss is minimised: the confident right run starts, and the wrong one never joins
    loss = greedy_select([_p(0.3, 0.3, 0.7, 0.7, 0.7), _p(0.9, 0.9, 0.1, 0.1, 0.1)], LABELS, "val_loss", 5)
    assert loss.counts.tolist() == [0, 1] and loss.stopped == STOP_NO_GAIN


@pytest.fixture(scope="module")
def members(module_tmp: Path) -> dict[str, Path]:
    """Two tiny members: a ResNet-18 at 32 px, image only; one at 24 px with clinical fields (concat)."""
    from core.model.fields import make_spec
    from core.model.networks import build_model, save_model_file

    torch.manual_seed(0)
    save_model_file(module_tmp / "a.pt", build_model(7, "none"), CLASSES,
                    TrainConfig(image_size=32, pretrained="none").to_dict(), {"epoch": 2})
    save_model_file(module_tmp / "b.pt", build_model(7, "none", fusion=make_spec("concat")), CLASSES,
                    TrainConfig(image_size=24, pretrained="none", metadata="concat").to_dict(), {"epoch": 3})
    from core.model.ensemble import save_ensemble_file

    save_ensemble_file(module_tmp / "ensemble.pt", [("a", module_tmp / "a.pt", 3), ("b", module_tmp / "b.pt", 1)],
                       {"calibration": {"temperature": {"single": 1.5}}})
    return {"a": module_tmp / "a.pt", "b": module_tmp / "b.pt", "ensemble": module_tmp / "ensemble.pt",
            "base": module_tmp}


def test_ensemble_file_round_trips_and_averages_its_members(members: dict[str, Path]) -> None:
    from core.model.calibration import apply_temperature
    from core.model.ensemble import EnsembleModel, resized
    from core.model.loading import load_for_inference

    ens = load_for_inference(members["ensemble"], "cpu")
    assert isinstance(ens, EnsembleModel) and ens.class_names == CLASSES and ens.header["image_size"] == 32
    assert ens.weights.tolist() == pytest.approx([0.75, 0.25]) and ens.fusion["width"] == 18
    a, b = load_for_inference(members["a"], "cpu"), load_for_inference(members["b"], "cpu")
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    clinical = ens.encode([{"age": 50, "sex": "male", "site": "back"}] * 3)
    assert clinical.shape == (3, 18)   # a takes no columns, b its 18
    raw = ens.predict(images, calibrated=False, clinical=clinical)
    expected = 0.75 * a.predict(images, calibrated=False) + 0.25 * b.predict(resized(images, 24), calibrated=False,
                                                                              clinical=clinical)
    np.testing.assert_allclose(raw, expected, atol=1e-6)
    np.testing.assert_allclose(ens.predict(images, clinical=clinical), apply_temperature(expected, 1.5), atol=1e-6)
    detail = ens.predict_detail(images, clinical=clinical)
    assert detail.member_probs.shape == (2, 3, 7) and detail.disagreement.shape == (3,)
    assert (detail.disagreement >= 0).all() and detail.disagreement.max() < np.log(2) + 1e-9
    same = ens.predict_detail(images[:1].repeat(2, 0), tta=True)
    assert same.probs.shape == (2, 7)


def test_members_that_agree_do_not_disagree() -> None:
    from core.model.ensemble import mutual_information

    p = np.array([[0.7, 0.3], [0.5, 0.5]])
    assert mutual_information(np.stack([p, p]), np.array([0.5, 0.5])) == pytest.approx([0, 0])
    split = mutual_information(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]), np.array([0.5, 0.5]))
    assert split == pytest.approx([np.log(2)])   # two sure members that disagree: log 2 nats


def test_a_damaged_or_missing_member_is_one_error_naming_it(members: dict[str, Path], tmp_path: Path) -> None:
    from core.model.ensemble import save_ensemble_file

    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(members["b"].read_bytes()[:1000])
    with pytest.raises(UserError, match=f"ensemble member b: {damaged}"):
        save_ensemble_file(tmp_path / "e.pt", [("a", members["a"], 1), ("b", damaged, 1)])
    with pytest.raises(UserError, match=f"ensemble member c: {tmp_path / 'gone.pt'}: no such"):
        save_ensemble_file(tmp_path / "e.pt", [("a", members["a"], 1), ("c", tmp_path / "gone.pt", 1)])
    assert not (tmp_path / "e.pt").exists()


# --- end to end: a tiny sweep folder with two trained runs and its ensemble.json, then core.final_train ---------

@pytest.fixture(scope="module")
def sweep(module_tmp: Path) -> Path:
    """A sweep folder as sweep.run leaves it, written directly: two 1-epoch runs at 32 px (the second with
    clinical fields), best.json naming the first, ensemble.json both (weights 2:1)."""
    import shutil

    from core.data.dataset import load_for_config
    from core.data.demo_data import generate_demo
    from core.ensemble_file import GreedyOutcome, choice_document, write_ensemble_choice
    from core.train import RunOptions, train

    root = generate_demo(module_tmp / "data", n_lesions=24, image_size=32, seed=2)
    folder = module_tmp / "sweep"
    configs = {"t1": TrainConfig(epochs=1, image_size=32, pretrained="none", batch_size=8, warmup_epochs=0.0,
                                 device="cpu"),
               "t2": TrainConfig(epochs=1, image_size=32, pretrained="none", batch_size=8, warmup_epochs=0.0,
                                 device="cpu", metadata="concat", seed=1)}
    for trial, cfg in configs.items():
        data = load_for_config(root, cfg, progress=False)
        train(cfg, data, folder / "trials" / trial, options=RunOptions(progress=False, tensorboard=False))
    assert (folder / "trials" / "t1" / "val_probs.npz").is_file()   # every run keeps its val probabilities
    with np.load(folder / "trials" / "t1" / "val_probs.npz") as kept:
        assert kept["probs"].shape == (len(data.indices("val")), 7) and (kept["labels"] == data.labels[data.indices("val")]).all()
    shutil.copy(folder / "trials" / "t1" / "splits.csv", folder / "splits.csv")
    best = {"format": "lesion-sweep/best", "version": 1, "config": configs["t1"].to_dict(),
            "metric": {"name": "val_balanced_accuracy", "value": 0.2, "mode": "max"}, "trial_id": "t1",
            "data": {"path": data.root, "fingerprint": data.fingerprint, "layout": data.layout},
            "splits_file": "splits.csv", "checkpoint": "trials/t1/best.pt",
            "code_version": {"package": "0.1.0", "git_commit": None, "git_dirty": None},
            "created": "2026-01-01T00:00:00+00:00"}
    (folder / "best.json").write_text(json.dumps(best))
    members = [{"trial_id": t, "role": "search", "count": c, "weight": c / 3, "checkpoint": f"trials/{t}/best.pt"}
               for t, c in (("t1", 2), ("t2", 1))]
    write_ensemble_choice(folder / "ensemble.json", choice_document(
        "val_balanced_accuracy", "max", 5, len(data.indices("val")),
        [{"trial_id": "t1", "role": "search", "value": 0.2}, {"trial_id": "t2", "role": "search", "value": 0.1}],
        members, GreedyOutcome([{"added": "t1", "value": 0.2}, {"added": "t2", "value": 0.25},
                                {"added": "t1", "value": 0.3}], "reached --ensemble-size picks", 0.3)))
    return folder


@pytest.fixture(scope="module")
def final(sweep: Path):
    from core.evaluation.sections import SectionOptions
    from core.final_train import FinalOptions, final_train

    return final_train(sweep / "best.json", FinalOptions(gallery_per_class=0, progress=False,
                                                         evaluation=SectionOptions(resamples=50)))


def test_final_train_builds_the_ensemble_beside_the_single_model(sweep: Path, final) -> None:
    from core.model.loading import load_for_inference

    out = final.out_dir
    ens = load_for_inference(out / "ensemble.pt", "cpu")
    assert [m["name"] for m in ens.header["members"]] == ["t1", "t2"] and ens.weights.tolist() == pytest.approx([2 / 3, 1 / 3])
    assert ens.temperature(False) is not None and ens.header["operating_points"]["positive_class"] == "mel"
    assert ens.fusion is not None   # t2's clinical fields
    # the check (on the first member's features) and the abstention rule, weighing the disagreement, fitted on val
    assert ens.header["ood"]["thresholds"]["mahalanobis"] > 0 and ens.header["abstention"]["chosen_on"] == "val"
    assert ens.header["abstention"]["disagreement_weight"] in (0.0, 0.25, 0.5, 1.0, 2.0)
    ensemble_metrics = json.loads((out / "ensemble" / "metrics.json").read_text())
    single_metrics = json.loads((out / "metrics.json").read_text())
    assert ensemble_metrics["n_images"] == single_metrics["n_images"] > 0
    comparison = json.loads((out / "ensemble_comparison.json").read_text())
    row = comparison["metrics"]["balanced_accuracy"]
    assert row["single"]["value"] == pytest.approx(single_metrics["test_balanced_accuracy"])
    assert row["ensemble"]["value"] == pytest.approx(ensemble_metrics["test_balanced_accuracy"])
    assert row["difference"]["value"] == pytest.approx(row["ensemble"]["value"] - row["single"]["value"])
    assert set(comparison["metrics"]) == {"balanced_accuracy", "auc", "ece"} and row["difference"]["interval"]
    report = (out / "report.md").read_text()
    assert "**Ensemble** of 2 sweep runs" in report and "| ECE |" in report
    assert (out / "ensemble" / "report.md").is_file()   # Grad-CAM of an ensemble: core.predict --gradcam below


def test_evaluate_and_predict_take_the_ensemble_file(sweep: Path, final, tmp_path: Path, capsys) -> None:
    from core import evaluate, predict

    out = final.out_dir
    data = Path(json.loads((sweep / "best.json").read_text())["data"]["path"])
    assert evaluate.main([str(out / "ensemble.pt"), "--data", str(data), "--out", str(tmp_path / "ev"),
                          "--splits", str(sweep / "splits.csv"), "--gallery", "1", "--bootstrap", "20"]) == 0
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    ensemble_metrics = json.loads((out / "ensemble" / "metrics.json").read_text())
    assert evaluated["test_balanced_accuracy"] == pytest.approx(ensemble_metrics["test_balanced_accuracy"])
    assert evaluated["gradcam"]["n_maps"] > 0 and list((tmp_path / "ev").glob("gradcam_*.png"))  # members' maps
    images = sorted(data.rglob("*.jpg"))[:2]
    capsys.readouterr()
    assert predict.main([str(out / "ensemble.pt"), *map(str, images), "--json", "--age", "40",
                         "--gradcam", str(tmp_path / "cams")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(r["disagreement"]["mutual_information"] >= 0 for r in rows)
    assert "members" in rows[0]["disagreement"]["words"] and len(list((tmp_path / "cams").glob("*.png"))) == 2
    assert all(r["ood"]["in_distribution"] is not None and "abstained" in r["abstain"] for r in rows)
    assert evaluated["ood"]["far_out"] and evaluated["abstention"]["rule"]["coverage"] > 0


def test_the_server_answers_with_the_members_disagreement(final) -> None:
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.service import ModelService, ServeOptions
    from tests.serve_fixtures import image_bytes

    service = ModelService.load(final.out_dir / "ensemble.pt", ServeOptions(device="cpu"))
    try:
        client = TestClient(create_app(service, max_body=2 * 2**20))
        body = client.post("/predict", files={"file": ("a.jpg", image_bytes(seed=3), "image/jpeg")},
                           data={"age": "60", "sex": "male", "explain": "true"}).json()
        assert sum(body["probabilities"].values()) == pytest.approx(1.0) and body["metadata"]["used"] is True
        assert body["disagreement"]["mutual_information"] >= 0 and "members" in body["disagreement"]["words"]
        assert body["explain"]["overlay_png"]
        assert body["ood"]["method"] == "mahalanobis" and isinstance(body["abstain"]["abstained"], bool)
        info = client.get("/info").json()
        assert [m["name"] for m in info["ensemble"]] == ["t1", "t2"] and info["test"]["balanced_accuracy"] is not None
    finally:
        service.close()


def test_a_damaged_member_stops_the_final_training_naming_it(sweep: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from core.errors import run_cli
    from core.final_train import main

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("final"))
    (copy / "trials" / "t2" / "best.pt").write_bytes(b"damaged")
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [str(copy / "best.json"), "--gallery", "0", "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert f"error: ensemble member t2: {copy / 'trials' / 't2' / 'best.pt'}" in err.splitlines()[-1]
