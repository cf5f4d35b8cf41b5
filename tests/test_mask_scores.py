"""core.explain.mask_scores on synthetic maps whose answers are known."""

from __future__ import annotations

import math

import numpy as np

from core.explain import mask_scores as es


def _square_mask(size: int = 20, lo: int = 5, hi: int = 15) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[lo:hi, lo:hi] = 1
    return mask


def test_a_map_inside_the_mask_scores_one_and_hits() -> None:
    mask = _square_mask()
    inside = np.zeros((20, 20), dtype=np.float32)
    inside[7:12, 6:10] = np.linspace(0.2, 1.0, 20).reshape(5, 4)
    assert es.energy_inside(inside[None], mask[None])[0] == 1.0
    assert es.pointing_hits(inside[None], mask[None])[0]


def test_a_uniform_map_scores_the_area_share_and_points_nowhere() -> None:
    mask = _square_mask()  # 100 of 400 pixels
    for flat in (np.ones((20, 20)), np.zeros((20, 20))):  # an all-zero map counts as flat too
        assert math.isclose(es.energy_inside(flat[None], mask[None])[0], 0.25)
        assert not es.pointing_hits(flat[None], mask[None])[0]


def test_a_map_outside_scores_zero_and_ties_go_by_majority() -> None:
    mask = _square_mask()
    outside = np.zeros((20, 20))
    outside[0:3, 0:3] = 1.0
    assert es.energy_inside(outside[None], mask[None])[0] == 0.0
    assert not es.pointing_hits(outside[None], mask[None])[0]
    ties = np.zeros((20, 20))
    ties[10, [2, 8, 9]] = 1.0  # two of three maxima inside
    assert es.pointing_hits(ties[None], mask[None])[0]
    ties[10, [0, 1]] = 1.0     # now two of five
    assert not es.pointing_hits(ties[None], mask[None])[0]
    negative = -np.ones((20, 20))
    negative[10, 10] = 2.0     # negative values carry no energy
    assert es.energy_inside(negative[None], mask[None])[0] == 1.0


def test_mean_pairwise_correlation_equals_numpys_and_skips_flat_maps() -> None:
    maps = np.random.default_rng(0).normal(size=(6, 8, 8))
    expected = np.corrcoef(maps.reshape(6, -1))[np.triu_indices(6, 1)].mean()
    assert math.isclose(es.mean_pairwise_correlation(maps), expected, abs_tol=1e-9)
    with_flat = np.concatenate([maps, np.zeros((2, 8, 8))])
    assert math.isclose(es.mean_pairwise_correlation(with_flat), expected, abs_tol=1e-9)
    assert math.isnan(es.mean_pairwise_correlation(maps[:1]))


def test_bias_alarm_fires_on_identical_maps_only() -> None:
    rng = np.random.default_rng(1)
    one = rng.random((16, 16))
    same = np.stack([one] * 5)
    assert math.isclose(es.mean_pairwise_correlation(same), 1.0)
    assert es.bias_alarm(es.mean_pairwise_correlation(same))
    assert "Position-bias alarm" in es.bias_note(1.0, 0.4) and "0.40" in es.bias_note(1.0, 0.4)
    different = rng.random((5, 16, 16))
    assert not es.bias_alarm(es.mean_pairwise_correlation(different))
    assert es.bias_note(0.1) is None and not es.bias_alarm(None)
    assert es.bias_alarm(0.55) and not es.bias_alarm(0.55, masks_correlation=0.6)  # as alike as the lesions


def test_centred_gaussian_peaks_in_the_middle() -> None:
    g = es.centred_gaussian(20)
    assert g.shape == (20, 20) and np.allclose(g, g.T) and np.allclose(g, g[::-1, ::-1])
    assert g[9:11, 9:11].min() == g.max() and g[0, 0] < 0.03
    assert es.centred_gaussian((10, 20)).shape == (10, 20)


def test_score_maps_overall_per_class_and_verdict() -> None:
    centred = _square_mask()
    corner = np.zeros((20, 20), dtype=np.uint8)
    corner[:6, :6] = 1
    masks = np.stack([centred, centred, corner])
    good = masks.astype(np.float32)            # maps exactly on each lesion
    scores = es.score_maps(good, masks, np.array([0, 0, 1]), ("mel", "nv", "bcc"), "test maps")
    overall = scores["overall"]
    assert overall["gradcam"]["energy_inside"] == 1.0 and overall["gradcam"]["pointing"] == 1.0
    assert math.isclose(overall["uniform"]["energy_inside"], (0.25 + 0.25 + 36 / 400) / 3)
    assert overall["centred_gaussian"]["pointing"] == 2 / 3  # the corner lesion is missed
    assert list(scores["per_class"]) == ["mel", "nv"] and scores["per_class"]["nv"]["gradcam"]["n_images"] == 1
    assert scores["beats_centred"] is True and "**beat**" in es.verdict(scores)
    rows = es.table(scores)
    assert rows[2].startswith("| all | 3 | 1.000 |") and len(rows) == 2 + 3

    bottom_right = np.zeros((3, 20, 20), dtype=np.float32)
    bottom_right[:, 15:, 15:] = 1.0            # the same corner, whatever the image
    biased = es.score_maps(bottom_right, masks, np.array([0, 0, 1]), ("mel", "nv", "bcc"), "corner maps")
    assert biased["beats_centred"] is False and "do not beat" in es.verdict(biased)
    assert biased["bias_alarm"] is True
