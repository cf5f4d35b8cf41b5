"""Evaluation of predicted probabilities against labels: the metrics, the metrics.json document, the figures.

A library, not a command: ``python -m core.evaluate`` and ``python -m core.final_train`` both evaluate through
it, so their metrics.json (format ``lesion-sweep/evaluation``) and figures are the same.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix

from core.errors import UserError

if TYPE_CHECKING:  # core.gradcam imports Captum: only when Grad-CAM runs
    from core.gradcam import Explainable, Explained, GradcamOptions

log = logging.getLogger(__name__)

EVALUATION_FORMAT = "lesion-sweep/evaluation"


@dataclass(frozen=True)
class Evaluation:
    """Predictions of a model on labelled images and the metrics they give (classes: the model's)."""

    class_names: tuple[str, ...]
    labels: np.ndarray            # int64 [N], index into class_names
    probs: np.ndarray             # float [N, C]
    metrics: dict[str, float]     # test_accuracy, test_balanced_accuracy, test_macro_f1, test_auc, test_loss
    per_class: dict[str, dict[str, float]]
    confusion: np.ndarray         # int64 [C, C], rows true, columns predicted


def evaluate_probs(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> Evaluation:
    """Metrics of predicted probabilities against labels; the loss is the plain cross-entropy."""
    from core.metrics import classification_metrics, per_class_report

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise UserError("nothing to evaluate: the chosen split holds no images")
    picked = probs[np.arange(len(labels)), labels]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-12, None))))
    return Evaluation(class_names=tuple(class_names), labels=labels, probs=probs,
                      metrics=classification_metrics(labels, probs, "test_", loss),
                      per_class=per_class_report(labels, probs, class_names),
                      confusion=confusion_matrix(labels, probs.argmax(1), labels=np.arange(len(class_names))))


def map_labels(data_classes: Sequence[str], model_classes: Sequence[str], labels: np.ndarray,
               source: str) -> np.ndarray:
    """Labels indexing ``data_classes`` -> the same classes' indices in ``model_classes``, by name."""
    index = {name: i for i, name in enumerate(model_classes)}
    used = sorted({data_classes[i] for i in np.unique(labels)})
    unknown = [name for name in used if name not in index]
    if unknown:
        raise UserError(f"{source}: classes the model does not know: {', '.join(unknown)} "
                        f"(the model's classes: {', '.join(model_classes)})")
    lookup = np.array([index.get(name, -1) for name in data_classes], dtype=np.int64)
    return lookup[np.asarray(labels, dtype=np.int64)]


def metrics_document(ev: Evaluation, source: Mapping[str, Any], training: Mapping[str, Any] | None = None,
                     gradcam: Mapping[str, Any] | None = None,
                     clinical: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metrics.json of an evaluation (one schema for core.evaluate and core.final_train).

    ``source``: what was evaluated (model file, split, data); ``training``: core.final_train's account of the
    training that made the model (absent for core.evaluate). Then the flat test_* metrics, per class figures,
    the confusion matrix, ``gradcam``: the heat maps' method and scores (core.gradcam.explain_evaluation;
    null without Grad-CAM), then ``clinical``'s sections (core/clinical.py: prediction, bootstrap, intervals,
    lesion_level, calibration, tta, operating_points, subgroups).
    """
    return {"format": EVALUATION_FORMAT, "version": 1, "status": "complete", "source": dict(source),
            **({"training": dict(training)} if training is not None else {}),
            **{k: _finite_or_none(v) for k, v in ev.metrics.items()},
            "n_images": int(len(ev.labels)), "class_names": list(ev.class_names),
            "per_class": ev.per_class, "confusion_matrix": ev.confusion.tolist(),
            "gradcam": None if gradcam is None else dict(gradcam), **dict(clinical or {})}


def write_figures(out: Path, ev: Evaluation, what: str, model: Any, device: Any, explainable: Explainable,
                  gradcam: GradcamOptions) -> tuple[list[tuple[str, str]], Explained]:
    """Confusion matrix, ROC curves and Grad-CAM of ``explainable`` (:func:`explainable`) into ``out``."""
    from core.figures import confusion_matrix_figure, roc_figure
    from core.gradcam import explain_evaluation

    confusion_matrix_figure(ev.confusion, ev.class_names, out / "confusion_matrix.png",
                            title=f"Confusion matrix, {what}")
    roc_figure(ev.labels, ev.probs, ev.class_names, out / "roc_curves.png",
               title=f"ROC curves, {what} (one class vs the rest)")
    figures = [("Confusion matrix", "confusion_matrix.png"), ("ROC curves", "roc_curves.png")]
    if gradcam.per_class > 0:
        log.info("Grad-CAM galleries (%d examples per class)", gradcam.per_class)
    return figures, explain_evaluation(model, explainable, out, device, gradcam)


def explainable(ev: Evaluation, images_uint8: np.ndarray, data: Any, idx: np.ndarray) -> Explainable:
    """The images ``idx`` of a Dataset with ``ev``'s labels and probabilities, and their lesion masks where the
    data has them: what :func:`write_figures` explains."""
    from core.gradcam import Explainable

    masks = {} if data.masks is None else {"masks": np.asarray(data.masks[idx]), "has_mask": data.has_mask[idx]}
    return Explainable(images_uint8, ev.labels, ev.probs, data.image_ids[idx], ev.class_names, **masks)


def headline(metrics: Mapping[str, float]) -> str:
    """One console line of the main metrics."""
    keys = ("test_balanced_accuracy", "test_accuracy", "test_macro_f1", "test_auc", "test_loss")
    return ", ".join(f"{k.removeprefix('test_')}={_fmt(metrics.get(k))}" for k in keys)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)  # JSON has no NaN (an AUC with one class present)
