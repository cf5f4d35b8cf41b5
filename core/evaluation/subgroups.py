"""Results per patient subgroup, from the dataset's metadata columns (HAM10000: sex, age, localization, dx_type).

Every metadata column the layout reads (core/data/layouts.py ``Listing.metadata``) is a subgroup variable
unless it has fewer than 2 or more than ``MAX_LEVELS`` distinct values (then it is an id or free text).
A numeric column is cut into bands: ages (a column named like ``age``) into clinical bands, any other
numeric column into quartiles. Empty values form the group ``unknown``.

Each group gets its balanced accuracy and the positive class's sensitivity (its recall: the share of its
images predicted as that class), with the number of images and lesions and a bootstrap interval over its
lesions (core/evaluation/bootstrap.py). A group with fewer than ``MIN_LESIONS`` lesions is listed as too small, not
scored: its figure would say more about chance than about the model.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

from core.evaluation.bootstrap import LesionBootstrap

MIN_LESIONS = 20
MAX_LEVELS = 25
AGE_BANDS = (0, 30, 45, 60, 75)   # years: <30, 30-44, 45-59, 60-74, >=75
UNKNOWN = "unknown"
_AGE_NAME = re.compile(r"(^|_)age($|_)", re.IGNORECASE)


def subgroup_variables(metadata: pd.DataFrame | None) -> dict[str, np.ndarray]:
    """Column name -> the group of each image (str [N]) for every column usable as a subgroup variable."""
    if metadata is None:
        return {}
    out = {}
    for name in metadata.columns:
        values = metadata[name].astype(str).str.strip()
        numbers = pd.to_numeric(values.where(values != ""), errors="coerce")
        if values.ne("").any() and numbers.notna().eq(values.ne("")).all():
            groups = _bands(numbers, bool(_AGE_NAME.search(str(name))))
        else:
            groups = values.where(values != "", UNKNOWN).to_numpy(dtype=str)
        if 2 <= len(np.unique(groups)) <= MAX_LEVELS:
            out[str(name)] = groups
    return out


def _bands(numbers: pd.Series, is_age: bool) -> np.ndarray:
    if is_age:
        edges = [*AGE_BANDS, np.inf]
        labels = [f"<{AGE_BANDS[1]}"] + [f"{low}-{high - 1}" for low, high in zip(AGE_BANDS[1:-1], AGE_BANDS[2:])] \
            + [f">={AGE_BANDS[-1]}"]
        banded = pd.cut(numbers, edges, right=False, labels=labels)
    else:
        banded = pd.qcut(numbers, 4, duplicates="drop")
    return banded.astype(str).where(numbers.notna(), UNKNOWN).to_numpy(dtype=str)


def subgroup_results(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray, metadata: pd.DataFrame | None,
                     positive: int | None, n_resamples: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Per variable, one row per group (largest first): sizes and, from ``MIN_LESIONS`` lesions, the figures."""
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=str)
    predicted = probs.argmax(1)
    out = {}
    for variable, values in subgroup_variables(metadata).items():
        rows = []
        for level in np.unique(values):
            members = np.flatnonzero(values == level)
            row: dict[str, Any] = {"group": str(level), "n_images": int(members.size),
                                   "n_lesions": int(len(np.unique(groups[members])))}
            if positive is not None:
                is_positive = labels[members] == positive
                row["n_positive_lesions"] = int(len(np.unique(groups[members][is_positive])))
            row["too_small"] = row["n_lesions"] < MIN_LESIONS
            if not row["too_small"]:
                row.update(_scores(labels[members], probs[members], predicted[members], groups[members], positive,
                                   n_resamples, seed))
            rows.append(row)
        out[variable] = sorted(rows, key=lambda r: (-r["n_lesions"], r["group"]))
    return out


def _scores(labels: np.ndarray, probs: np.ndarray, predicted: np.ndarray, groups: np.ndarray,
            positive: int | None, n_resamples: int, seed: int) -> dict[str, Any]:
    boot = LesionBootstrap.draw(groups, n_resamples, seed)
    samples = boot.metrics(labels, probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # predicted classes absent from the group's labels: the figure stays right
        balanced = float(balanced_accuracy_score(labels, predicted))
    scores: dict[str, Any] = {"balanced_accuracy": balanced,
                              "balanced_accuracy_ci": boot.interval(samples["balanced_accuracy"])}
    if positive is not None:
        is_positive = labels == positive
        scores["sensitivity"] = float((predicted[is_positive] == positive).mean()) if is_positive.any() else None
        scores["sensitivity_ci"] = boot.interval(samples["recall"][:, positive]) if is_positive.any() else None
    return scores
