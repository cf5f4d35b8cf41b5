"""Two sets of probabilities for the same labelled images side by side: balanced accuracy, macro AUC and ECE of
each with 95% intervals, and the paired difference (second minus first) with its interval, all from one lesion
bootstrap (core/evaluation/bootstrap.py: the same resamples for both, so the difference's interval is a paired one).

A library: core.final_train compares its single model with the sweep's ensemble (core/final_ensemble.py);
bench/ensemble_study.py compares winner, ensemble and plain average.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from core.evaluation.bootstrap import LesionBootstrap
from core.model.calibration import ECE_BINS, expected_calibration_error
from core.evaluation.metrics import classification_metrics

METRICS = ("balanced_accuracy", "auc", "ece")
NAMES = {"balanced_accuracy": "balanced accuracy", "auc": "macro AUC", "ece": "ECE"}


def weighted_ece(boot: LesionBootstrap, labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Per resample, the top-label ECE (core/model/calibration.py), each image weighted by its lesion's draws [B]."""
    confidence = probs.max(1)
    correct = (probs.argmax(1) == np.asarray(labels)).astype(np.float64)
    bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], confidence)
    onehot = np.eye(n_bins)[bins]                               # [N, bins]
    weights = boot.weights                                      # [B, N]
    gap = np.abs(weights @ (onehot * correct[:, None]) - weights @ (onehot * confidence[:, None]))
    return gap.sum(1) / weights.sum(1)


def _resampled(boot: LesionBootstrap, labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    drawn = boot.metrics(labels, probs)
    return {"balanced_accuracy": drawn["balanced_accuracy"], "auc": drawn["auc"],
            "ece": weighted_ece(boot, labels, probs)}


def point(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    plain = classification_metrics(labels, probs, "")
    return {"balanced_accuracy": plain["balanced_accuracy"], "auc": plain["auc"],
            "ece": expected_calibration_error(labels, probs)}


def compare(labels: np.ndarray, groups: np.ndarray, first: np.ndarray, second: np.ndarray,
            names: tuple[str, str] = ("single", "ensemble"), resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Each metric of ``first`` and ``second`` with its interval, and ``second - first`` with its paired interval."""
    labels = np.asarray(labels, dtype=np.int64)
    boot = LesionBootstrap.draw(groups, max(1, resamples), seed)
    drawn = [_resampled(boot, labels, p) for p in (first, second)]
    values = [point(labels, p) for p in (first, second)]
    out: dict[str, Any] = {"names": list(names), "n_images": int(len(labels)), "lesions": boot.n_lesions,
                           "resamples": boot.n_resamples, "seed": seed, "metrics": {}}
    for metric in METRICS:
        out["metrics"][metric] = {
            names[0]: {"value": values[0][metric], "interval": boot.interval(drawn[0][metric])},
            names[1]: {"value": values[1][metric], "interval": boot.interval(drawn[1][metric])},
            "difference": {"value": values[1][metric] - values[0][metric],
                           "interval": boot.interval(drawn[1][metric] - drawn[0][metric])}}
    return out


def comparison_table(doc: Mapping[str, Any]) -> list[str]:
    """A markdown table of :func:`compare`'s document."""
    first, second = doc["names"]

    def cell(entry: Mapping[str, Any], signed: bool = False) -> str:
        interval = entry["interval"]
        value = f"{entry['value']:+.4f}" if signed else f"{entry['value']:.4f}"
        return value if interval is None else f"{value} [{interval[0]:.4f}, {interval[1]:.4f}]"

    lines = [f"| metric | {first} | {second} | {second} - {first} (paired) |", "| --- | --- | --- | --- |"]
    for metric, row in doc["metrics"].items():
        lines.append(f"| {NAMES[metric]} | {cell(row[first])} | {cell(row[second])} | "
                     f"{cell(row['difference'], True)} |")
    return lines
