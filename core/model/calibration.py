"""Whether predicted probabilities mean what they say: temperature scaling, ECE, Brier score, NLL.

Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017) divides the
logits by one scalar T > 0, fitted on the validation split by minimising the negative log-likelihood.
It never changes which class is predicted, only how confident the prediction is. The commands keep
probabilities rather than logits; ``log p`` differs from the logits by a constant per image, which a
softmax ignores, so ``softmax(log p / T)`` is exactly ``softmax(logits / T)``. That also calibrates the
average of the test-time-augmentation views (core/model/tta.py), which has no logits of its own.

``core.final_train`` fits T (one for single-view prediction, one for TTA) and stores them in model.pt;
``core.evaluate`` and ``core.predict`` apply them unless ``--no-calibration``. Never fitted on training
images: with ``--train-on-val`` there is no held-out split and the model stays uncalibrated.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import brier_score_loss

ECE_BINS = 15
# The search range of T; a fitted value at either end means the fit is not to be trusted (e.g. a tiny val split).
TEMPERATURE_BOUNDS = (0.05, 20.0)
_TINY = 1e-300  # float32 softmax can round a probability to 0; its log must stay finite


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _TINY, None))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: the probabilities of the logits divided by ``temperature``."""
    return softmax(_log_probs(probs) / temperature, axis=1)


def negative_log_likelihood(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean cross-entropy of the true class (the loss of core/evaluation/pipeline.py)."""
    labels = np.asarray(labels, dtype=np.int64)
    return float(-_log_probs(probs)[np.arange(len(labels)), labels].mean())


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The T minimising the NLL of ``apply_temperature(probs, T)``, searched on log T (scipy, bounded)."""
    labels = np.asarray(labels, dtype=np.int64)
    logp = _log_probs(probs)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logp / math.exp(log_t), axis=1)[rows, labels].mean())

    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label reliability: per confidence bin, (images, accuracy, mean confidence); NaN where empty.

    Confidence is the top class's probability; bins split [0, 1] evenly and are closed on the right, as in
    sklearn's ``calibration_curve(strategy="uniform")`` (which gives the same accuracies and confidences,
    but not the counts ECE weights them by).
    """
    labels = np.asarray(labels, dtype=np.int64)
    confidence = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], confidence)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / count
        mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / count
    return count, accuracy, mean_confidence


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: the image-weighted mean over bins of |accuracy - confidence| (Guo et al., 15 bins)."""
    count, accuracy, confidence = reliability_bins(labels, probs, n_bins)
    used = count > 0
    return float(np.sum(count[used] * np.abs(accuracy[used] - confidence[used])) / count.sum())


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of sum over classes (p - onehot)^2, in [0, 2]."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(1, keepdims=True)  # float32 softmax sums to 1 only within 1e-7: sklearn warns
    return float(brier_score_loss(labels, probs, labels=np.arange(probs.shape[1]), scale_by_half=False))


def calibration_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """ECE (15 bins, top label), multi-class Brier score and NLL of one set of probabilities."""
    return {"ece": expected_calibration_error(labels, probs), "brier": brier_score(labels, probs),
            "nll": negative_log_likelihood(labels, probs)}
