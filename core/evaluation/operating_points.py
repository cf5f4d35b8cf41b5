"""Operating points for one class against the rest (melanoma by default): thresholds chosen on val, applied to test.

A clinic runs a model at a threshold on the positive class's probability, chosen for a wanted
sensitivity or specificity. The threshold must be chosen on images the evaluation does not score:
``choose_thresholds`` picks them on the validation split (core.final_train, which stores them in
model.pt), ``apply_thresholds`` measures what they give on the test split (or on an external set,
with core.evaluate). An image is called positive when its probability is >= the threshold (sklearn's
``roc_curve`` convention).

For each target t in 0.80, 0.90, 0.95: "sensitivity at specificity t" is the threshold of the highest
sensitivity whose val specificity is at least t; "specificity at sensitivity t" likewise the other way.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import roc_curve

from core.evaluation.bootstrap import LesionBootstrap
from core.errors import UserError

TARGETS = (0.80, 0.90, 0.95)
DEFAULT_POSITIVE = "mel"
KINDS = ("sensitivity_at_specificity", "specificity_at_sensitivity")


def positive_index(class_names: Sequence[str], requested: str | None) -> int | None:
    """The positive class's index: ``requested``, else 'mel' when it is a class, else None (no operating points)."""
    if requested is None:
        return list(class_names).index(DEFAULT_POSITIVE) if DEFAULT_POSITIVE in class_names else None
    if requested not in class_names:
        raise UserError(f"--positive-class {requested}: not a class of the model (its classes: "
                        f"{', '.join(class_names)})")
    return list(class_names).index(requested)


def choose_thresholds(positive: np.ndarray, score: np.ndarray, targets: Sequence[float] = TARGETS
                      ) -> list[dict[str, Any]]:
    """For each kind and target: the threshold, and the sensitivity and specificity it gives on these images."""
    positive = np.asarray(positive, dtype=bool)
    if not 0 < positive.sum() < len(positive):
        raise ValueError("choosing thresholds needs positive and negative images")
    fpr, tpr, thresholds = roc_curve(positive, score, drop_intermediate=False)
    specificity = 1.0 - fpr
    # roc_curve's first threshold is +inf (nothing positive); a finite one just above the top score does the same.
    thresholds[0] = np.nextafter(thresholds[1], np.inf)
    rows = []
    for kind in KINDS:
        meets, gain = (specificity, tpr) if kind == "sensitivity_at_specificity" else (tpr, specificity)
        for target in targets:
            ok = np.flatnonzero(meets >= target - 1e-12)
            best = ok[np.lexsort((meets[ok], gain[ok]))[-1]]  # the most gain; between equals, the most margin
            rows.append({"kind": kind, "target": float(target), "threshold": float(thresholds[best]),
                         "sensitivity": float(tpr[best]), "specificity": float(specificity[best])})
    return rows


def apply_thresholds(rows: Sequence[dict[str, Any]], positive: np.ndarray, score: np.ndarray,
                     boot: LesionBootstrap | None = None) -> list[dict[str, Any]]:
    """Sensitivity and specificity of each chosen threshold on other images (with bootstrap intervals)."""
    positive = np.asarray(positive, dtype=bool)
    out = []
    for row in rows:
        called = np.asarray(score) >= row["threshold"]
        result = {"sensitivity": _share(called[positive]), "specificity": _share(~called[~positive])}
        if boot is not None:
            result["sensitivity_ci"] = boot.interval(boot.rate(called, positive))
            result["specificity_ci"] = boot.interval(boot.rate(~called, ~positive))
        out.append(result)
    return out


def _share(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None
