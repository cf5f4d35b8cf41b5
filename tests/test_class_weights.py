import numpy as np
import pytest

from core.training.class_weights import class_weights


def test_none():
    assert class_weights(np.array([10, 20]), "none") is None


def test_inverse_by_hand():
    # 1/10, 1/30, 1/60 normalised to average 1: multiply by 3 / (1/10 + 1/30 + 1/60) = 3 / 0.15 = 20
    np.testing.assert_allclose(class_weights(np.array([10, 30, 60]), "inverse"), [2.0, 2 / 3, 1 / 3])


def test_sqrt_inverse_by_hand():
    w = class_weights(np.array([1, 4, 16]), "sqrt_inverse")
    raw = np.array([1, 0.5, 0.25])
    np.testing.assert_allclose(w, raw * 3 / raw.sum())


def test_effective_by_hand():
    beta = 0.9
    counts = np.array([1, 2, 10])
    raw = (1 - beta) / (1 - beta ** counts)  # 1, 0.1/0.19, 0.1/(1-0.9**10)
    np.testing.assert_allclose(class_weights(counts, "effective", beta), raw * 3 / raw.sum())
    # beta -> 0 gives equal weights, large beta approaches inverse frequency
    np.testing.assert_allclose(class_weights(counts, "effective", 0.0), [1, 1, 1])
    np.testing.assert_allclose(class_weights(counts, "effective", 0.999999),
                               class_weights(counts, "inverse"), rtol=1e-3)


def test_absent_class_gets_zero():
    w = class_weights(np.array([5, 0, 5]), "inverse")
    np.testing.assert_allclose(w, [1.0, 0.0, 1.0])


def test_unknown_method():
    with pytest.raises(ValueError):
        class_weights(np.array([1]), "bogus")
