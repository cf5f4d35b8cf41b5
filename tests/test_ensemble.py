"""The sweep's ensemble: greedy selection on hand-made probabilities, the ensemble model file, and the commands
(core.evaluate, core.predict, the server) on an ensemble of two tiny members, one with clinical fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import TrainConfig
from core.errors import UserError
from sweep.ensemble import STOP_NO_GAIN, STOP_SIZE, greedy_select

REPO = Path(__file__).resolve().parents[1]
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
    from core.metadata import make_spec
    from core.model import build_model, save_model_file

    torch.manual_seed(0)
    save_model_file(module_tmp / "a.pt", build_model(7, "none"), CLASSES,
                    TrainConfig(image_size=32, pretrained="none").to_dict(), {"epoch": 2})
    save_model_file(module_tmp / "b.pt", build_model(7, "none", metadata=make_spec("concat")), CLASSES,
                    TrainConfig(image_size=24, pretrained="none", metadata="concat").to_dict(), {"epoch": 3})
    from core.ensemble_model import save_ensemble_file

    save_ensemble_file(module_tmp / "ensemble.pt", [("a", module_tmp / "a.pt", 3), ("b", module_tmp / "b.pt", 1)],
                       {"calibration": {"temperature": {"single": 1.5}}})
    return {"a": module_tmp / "a.pt", "b": module_tmp / "b.pt", "ensemble": module_tmp / "ensemble.pt",
            "base": module_tmp}


def test_ensemble_file_round_trips_and_averages_its_members(members: dict[str, Path]) -> None:
    from core.calibration import apply_temperature
    from core.ensemble_model import EnsembleModel, resized
    from core.inference import load_for_inference

    ens = load_for_inference(members["ensemble"], "cpu")
    assert isinstance(ens, EnsembleModel) and ens.class_names == CLASSES and ens.meta["image_size"] == 32
    assert ens.weights.tolist() == pytest.approx([0.75, 0.25]) and ens.metadata_spec["width"] == 18
    a, b = load_for_inference(members["a"], "cpu"), load_for_inference(members["b"], "cpu")
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    meta = ens.encode([{"age": 50, "sex": "male", "site": "back"}] * 3)
    assert meta.shape == (3, 18)   # a takes no columns, b its 18
    raw = ens.predict(images, calibrated=False, metadata=meta)
    expected = 0.75 * a.predict(images, calibrated=False) + 0.25 * b.predict(resized(images, 24), calibrated=False,
                                                                              metadata=meta)
    np.testing.assert_allclose(raw, expected, atol=1e-6)
    np.testing.assert_allclose(ens.predict(images, metadata=meta), apply_temperature(expected, 1.5), atol=1e-6)
    detail = ens.predict_detail(images, metadata=meta)
    assert detail.member_probs.shape == (2, 3, 7) and detail.disagreement.shape == (3,)
    assert (detail.disagreement >= 0).all() and detail.disagreement.max() < np.log(2) + 1e-9
    same = ens.predict_detail(images[:1].repeat(2, 0), tta=True)
    assert same.probs.shape == (2, 7)


def test_members_that_agree_do_not_disagree() -> None:
    from core.ensemble_model import mutual_information

    p = np.array([[0.7, 0.3], [0.5, 0.5]])
    assert mutual_information(np.stack([p, p]), np.array([0.5, 0.5])) == pytest.approx([0, 0])
    split = mutual_information(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]), np.array([0.5, 0.5]))
    assert split == pytest.approx([np.log(2)])   # two sure members that disagree: log 2 nats


def test_a_damaged_or_missing_member_is_one_error_naming_it(members: dict[str, Path], tmp_path: Path) -> None:
    from core.ensemble_model import save_ensemble_file

    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(members["b"].read_bytes()[:1000])
    with pytest.raises(UserError, match=f"ensemble member b: {damaged}"):
        save_ensemble_file(tmp_path / "e.pt", [("a", members["a"], 1), ("b", damaged, 1)])
    with pytest.raises(UserError, match=f"ensemble member c: {tmp_path / 'gone.pt'}: no such"):
        save_ensemble_file(tmp_path / "e.pt", [("a", members["a"], 1), ("c", tmp_path / "gone.pt", 1)])
    assert not (tmp_path / "e.pt").exists()
