"""The metrics a run reports, stated once: name, label and which way is better; and a value as JSON wants it.

Every metric is reported per split with its prefix (``train_``, ``val_``, ``test_``): ``val_balanced_accuracy``
picks checkpoints and is the sweep's default, the report, tables, figures and console lines read their labels
here, and a loss is the one metric that is minimised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SPLIT_PREFIXES = ("train_", "val_", "test_")


@dataclass(frozen=True)
class Metric:
    name: str                 # without its split prefix, e.g. "balanced_accuracy"
    label: str                # how a page or a figure names it
    maximised: bool = True    # False: lower is better (a loss)
    definition: str = ""      # the label with what it means, where a report states it once (default: the label)

    @property
    def described(self) -> str:
        return self.definition or self.label


METRICS = (Metric("balanced_accuracy", "balanced accuracy", definition="balanced accuracy (mean recall)"),
           Metric("accuracy", "accuracy"), Metric("macro_f1", "macro F1"),
           Metric("auc", "macro ROC AUC", definition="macro ROC AUC (one vs rest)"),
           Metric("loss", "cross-entropy loss", maximised=False))
BY_NAME = {m.name: m for m in METRICS}
SELECT_METRICS = tuple(f"val_{m.name}" for m in METRICS)   # what may pick a checkpoint or steer a sweep
DEFAULT_METRIC = "val_balanced_accuracy"


def metric_of(key: str) -> Metric:
    """The registry's entry of a prefixed (``val_auc``) or plain (``auc``) metric key."""
    for prefix in SPLIT_PREFIXES:
        key = key.removeprefix(prefix)
    return BY_NAME[key]


def label(key: str) -> str:
    return metric_of(key).label


def minimised(key: str) -> bool:
    """True where lower is better (a loss): for checkpoints, the sweep's mode and the pages."""
    return not metric_of(key).maximised


def finite_or_none(value: object) -> float | None:
    """A number as JSON wants it: a finite float, or None (NaN, infinity, missing, bool, not a number).

    JSON has no NaN, and an AUC with one class present is one."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
