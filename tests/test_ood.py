"""When not to trust the answer: the out-of-distribution score (core/model/ood.py), the abstention rule (core/model/abstain.py),
the far-out and shifted sets (core/evaluation/ood_sets.py) and the risk-coverage figures (core/evaluation/trust.py).

A random-init 32 px ResNet-18 (no training) fitted on generated lesion-like images (tests/serve_fixtures.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from core.model import abstain, ood
from core.model.checked_prediction import predict_checked
from core.model.inference import predict_probs
from core.model.loading import load_for_inference
from core.evaluation.trust import risk_coverage
from core.evaluation.ood_sets import SHIFTS, natural_photos, shifted, synthetic
from tests.serve_fixtures import lesion_like, write_model

SIZE = 32


@pytest.fixture(scope="module")
def loaded(module_tmp: Path):
    return load_for_inference(write_model(module_tmp / "model.pt", image_size=SIZE), "cpu")


def test_the_score_separates_lesion_like_images_from_far_out_ones(loaded) -> None:
    far = np.concatenate([natural_photos(SIZE)[0][::4], synthetic(SIZE, per_kind=4)[0]])
    scores = {}
    for name, images in (("in", lesion_like(40, SIZE, seed=5)), ("far", far)):  # "in": new, like the fitted
        with ood.capture(loaded.model) as seen:
            loaded.predict(images)
        scores[name] = ood.all_scores(loaded.header["ood"], seen.features, seen.logits)["mahalanobis"]
    auroc = roc_auc_score(np.r_[np.zeros(40), np.ones(len(far))], np.r_[scores["in"], scores["far"]])
    assert auroc > 0.95
    threshold = loaded.header["ood"]["thresholds"]["mahalanobis"]
    assert np.mean(scores["in"] <= threshold) >= 0.8 and np.mean(scores["far"] > threshold) >= 0.8


def test_thresholds_are_stored_read_back_and_used(loaded, module_tmp: Path) -> None:
    payload = torch.load(module_tmp / "model.pt", weights_only=True)
    stored = payload["ood"]
    assert set(stored["thresholds"]) == set(ood.SCORES) and stored["fitted_on"] == "val"
    assert stored["means"].shape == (7, stored["feature_dim"]) and stored["precision"].shape == (512, 512)
    assert loaded.header["ood"]["thresholds"] == stored["thresholds"]
    assert payload["abstention"]["coverage"] == 0.9 and len(payload["abstention"]["views"]["single"]["quantiles"]) == 201
    images = lesion_like(3, SIZE, seed=7)
    probs, checks = predict_checked(loaded, images)
    assert np.allclose(probs, loaded.predict(images))   # the check takes nothing from the probabilities
    for check in checks:
        assert check["ood"]["threshold"] == stored["thresholds"]["mahalanobis"]
        assert check["ood"]["in_distribution"] == (check["ood"]["score"] <= check["ood"]["threshold"])
        assert check["abstain"]["threshold"] == pytest.approx(payload["abstention"]["views"]["single"]["threshold"])


def test_tta_keeps_each_images_own_view_in_the_captured_features(loaded) -> None:
    images = lesion_like(3, SIZE, seed=8)
    with ood.capture(loaded.model) as single:
        predict_probs(loaded.model, images)
    with ood.capture(loaded.model, views=8) as tta:
        loaded.predict(images, tta=True)
    assert tta.features.shape == single.features.shape == (3, 512)
    np.testing.assert_allclose(tta.features, single.features, rtol=1e-4, atol=1e-5)


def test_the_abstention_rule_answers_the_asked_share_and_says_why() -> None:
    rng = np.random.default_rng(0)
    val = rng.dirichlet(np.ones(4) * 0.5, size=1000)
    stored = abstain.fit({"single": val}, coverage=0.8)
    answered = abstain.confidence(val) >= stored["views"]["single"]["threshold"]
    assert abs(answered.mean() - 0.8) < 0.01
    assert abstain.threshold(stored, "single", 0.5) > abstain.threshold(stored, "single")  # fewer answered: stricter
    probs = np.array([[0.97, 0.01, 0.01, 0.01], [0.3, 0.3, 0.2, 0.2], [0.97, 0.01, 0.01, 0.01]])
    far = {"score": 9.0, "threshold": 1.0, "in_distribution": False}
    near = {"score": 0.5, "threshold": 1.0, "in_distribution": True}
    decided = abstain.decide(stored, probs, "single", [near, near, far])
    assert [d["reason"] for d in decided] == [None, "low_confidence", "out_of_distribution"]
    assert "too unsure" in decided[1]["detail"] and "does not look like the training images" in decided[2]["detail"]
    # an ensemble's disagreement lowers the confidence the same threshold is applied to
    weighted = {**stored, "disagreement_weight": 1.0}
    assert abstain.decide(weighted, probs[:1], "single", disagreement=np.array([0.9]))[0]["abstained"]
    assert abstain.decide(None, probs, "single")[1] == {**abstain.decide(None, probs, "single")[1],
                                                         "abstained": False, "detail": abstain.NO_RULE}
    with pytest.raises(Exception, match="coverage"):
        abstain.check_coverage(1.5)


def test_risk_coverage_of_a_perfect_and_a_useless_confidence() -> None:
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    right = np.eye(2)[labels] * 0.5 + 0.25            # right, confident 0.75
    probs = np.where(np.arange(10)[:, None] < 8, right, 1 - right)   # the last two wrong ...
    probs[8:] = [[0.45, 0.55], [0.55, 0.45]]           # ... and the least sure
    curve = risk_coverage(labels, probs)
    assert curve["at"]["0.80"]["balanced_accuracy"] == 1.0 and curve["at"]["1.00"]["accuracy"] == 0.8
    assert curve["aurc"] == pytest.approx((1 / 9 + 2 / 10) / 10)   # errors only in the last two coverages


def test_far_out_sets_and_shifts_are_image_sized_and_change_the_image() -> None:
    photos, names = natural_photos(SIZE)
    assert photos.shape[1:] == (3, SIZE, SIZE) and photos.dtype == np.uint8 and len(photos) >= 50
    assert any(n.startswith("sklearn.china") for n in names) and any(n.startswith("skimage.astronaut") for n in names)
    made, kinds = synthetic(SIZE, per_kind=2)
    assert made.shape == (8, 3, SIZE, SIZE) and {k.split("/")[0] for k in kinds} == {"uniform_noise",
                                                                                     "gaussian_noise", "flat", "gradient"}
    images = lesion_like(2, SIZE, seed=3)
    for shift in SHIFTS:
        changed = shifted(images, shift)
        assert changed.shape == images.shape and not np.array_equal(changed, images), shift


def test_the_disagreement_weight_is_the_one_that_ranks_the_errors_last() -> None:
    from core.model import abstain

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    probs = np.full((400, 3), 0.2)
    probs[np.arange(400), labels] = 0.6            # every top probability the same and right ...
    wrong = rng.random(400) < 0.3
    probs[wrong] = np.roll(probs[wrong], 1, axis=1)   # ... except 30%, which only the disagreement tells apart
    disagreement = np.where(wrong, 0.5, 0.0) + rng.uniform(0, 0.05, 400)
    assert abstain.choose_weight(probs, labels, disagreement) > 0
    assert abstain.choose_weight(probs, labels, rng.uniform(0, 0.5, 400)) in abstain.WEIGHTS
    fitted = abstain.fit({"single": probs}, 0.6, {"single": disagreement}, 1.0)
    decided = abstain.decide(fitted, probs, "single", disagreement=disagreement)
    answered = np.array([not d["abstained"] for d in decided])
    assert answered.mean() == pytest.approx(0.6, abs=0.02) and not wrong[answered].any()
