"""What an evaluation computes beyond the headline metrics: calibration, TTA, lesion level, intervals,
operating points and subgroups. The evaluation pipeline (core/evaluation/pipeline.py, used by core.final_train and
core.evaluate) goes through here, so their metrics.json carry the same sections. Computing only: the
report's tables of these sections are core/evaluation/tables.py, the reliability diagram core/evaluation/figures.py.

- ``fit_on_val`` (core.final_train only): the calibration temperatures (core/model/calibration.py) and the
  operating thresholds of the positive class (core/evaluation/operating_points.py), chosen on the validation split
  and stored in model.pt. Never on test, never on training images (``not_fitted`` says why not).
- ``section_results``: on the evaluated images (the test split, or an external set), with what model.pt
  stores; returns the probabilities the headline metrics use and the metrics.json sections.

Prediction modes: a view (``single``, or ``tta``: core/model/tta.py) and calibrated or raw; the headline uses
the asked view, calibrated where model.pt has its temperature unless ``--no-calibration``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from core.evaluation.bootstrap import DEFAULT_RESAMPLES, LEVEL, LesionBootstrap
from core.model.calibration import ECE_BINS, TEMPERATURE_BOUNDS, apply_temperature, calibration_metrics, fit_temperature
from core.model.inference import SINGLE_MODE, TTA_MODE
from core.evaluation.lesions import by_lesion, has_lesion_ids
from core.evaluation.metrics import classification_metrics, per_class_report
from core.evaluation.operating_points import apply_thresholds, choose_thresholds, positive_index
from core.evaluation.subgroups import subgroup_results

INTERVAL_KEYS = ("test_balanced_accuracy", "test_accuracy", "test_auc")


@dataclass(frozen=True)
class SectionOptions:
    """How to predict and what to add (the commands' --tta, --no-calibration, --positive-class, --bootstrap)."""

    tta: bool = False
    calibrated: bool = True
    positive_class: str | None = None     # None: 'mel' when it is a class
    resamples: int = DEFAULT_RESAMPLES    # 0: no intervals
    seed: int = 0


@dataclass(frozen=True)
class EvaluatedSet:
    """Labelled images and the model's raw (uncalibrated) probabilities for them, per view."""

    labels: np.ndarray                    # int64 [N], index into the model's classes
    groups: np.ndarray                    # str [N] lesion ids (image ids where none)
    image_ids: np.ndarray                 # str [N]
    metadata: Any                         # pandas DataFrame (row i = image i) or None
    raw: Mapping[str, np.ndarray]         # view ('single', 'tta') -> float [N, C]


@dataclass(frozen=True)
class SectionResults:
    """What :func:`section_results` found: the headline probabilities, the sections, the reliability panels."""

    probs: np.ndarray                     # what the headline metrics use
    sections: dict[str, Any]              # metrics.json sections (JSON-ready: no NaN)
    reliability: list[tuple[str, np.ndarray, np.ndarray]]   # the reliability diagram's panels


def mode_key(view: str, calibrated: bool) -> str:
    return f"{view}/{'calibrated' if calibrated else 'raw'}"


# --- on the validation split (core.final_train) ------------------------------------------------------------

def fit_on_val(val: EvaluatedSet, class_names: Sequence[str], positive_class: str | None) -> dict[str, Any]:
    """model.pt's ``calibration`` (a temperature per view) and ``operating_points`` (thresholds per mode)."""
    temperatures = {view: fit_temperature(val.labels, probs) for view, probs in val.raw.items()}
    calibration: dict[str, Any] = {"fitted_on": "val", "n_images": int(len(val.labels)), "temperature": temperatures}
    at_bound = [view for view, t in temperatures.items() if any(math.isclose(t, b, rel_tol=1e-3)
                                                                for b in TEMPERATURE_BOUNDS)]
    if at_bound:  # the NLL still fell at the end of the range: too few or too easy val images to trust it
        calibration["warning"] = f"temperature at the end of its search range for {', '.join(at_bound)}"
    positive = positive_index(class_names, positive_class)
    if positive is None:
        return {"calibration": calibration, "operating_points": None}
    is_positive = val.labels == positive
    points: dict[str, Any] = {"positive_class": class_names[positive], "chosen_on": "val",
                              "n_images": int(len(val.labels)), "n_positive": int(is_positive.sum())}
    if not 0 < is_positive.sum() < len(is_positive):
        points["skipped"] = f"the validation split has no {'' if not is_positive.any() else 'non-'}" \
                            f"{class_names[positive]} images to choose thresholds on"
        return {"calibration": calibration, "operating_points": points}
    points["modes"] = {}
    for view, raw in val.raw.items():
        for calibrated in (False, True):
            score = (apply_temperature(raw, temperatures[view]) if calibrated else raw)[:, positive]
            points["modes"][mode_key(view, calibrated)] = {
                "auc": float(roc_auc_score(is_positive, score)), "points": choose_thresholds(is_positive, score)}
    return {"calibration": calibration, "operating_points": points}


def not_fitted(reason: str) -> dict[str, Any]:
    """What model.pt stores when there is nothing held out to fit on (``--train-on-val``)."""
    return {"calibration": {"skipped": reason}, "operating_points": {"skipped": reason}}


# --- on the evaluated images --------------------------------------------------------------------------------

def section_results(data: EvaluatedSet, class_names: Sequence[str], stored: Mapping[str, Any],
                        options: SectionOptions) -> SectionResults:
    """The headline probabilities and every section, using model.pt's ``stored`` temperatures and thresholds."""
    positive = positive_index(class_names, options.positive_class)  # a bad name fails before any work
    view = TTA_MODE if options.tta else SINGLE_MODE
    fitted = stored.get("calibration") or {}
    temperatures = fitted.get("temperature") or {}
    calibrated = {v: apply_temperature(p, temperatures[v]) for v, p in data.raw.items() if temperatures.get(v)}
    use_calibrated = options.calibrated and view in calibrated

    def chosen(v: str) -> np.ndarray:
        return calibrated[v] if options.calibrated and v in calibrated else data.raw[v]

    probs = chosen(view)
    boot = LesionBootstrap.draw(data.groups, options.resamples, options.seed)  # 0 resamples: no intervals
    sections: dict[str, Any] = {
        "prediction": {"view": view, "calibrated": use_calibrated,
                       "temperature": temperatures.get(view) if use_calibrated else None,
                       "positive_class": None if positive is None else class_names[positive]},
        "bootstrap": {"unit": "lesion" if has_lesion_ids(data.groups, data.image_ids) else "image",
                      "units": boot.n_lesions, "resamples": boot.n_resamples, "seed": options.seed, "level": LEVEL,
                      "method": "percentile"},
        "intervals": _intervals(boot, data.labels, probs, class_names),
        "lesion_level": _lesion_level(data, probs, class_names, options),
        "calibration": _calibration(data.labels, data.raw[view], calibrated.get(view), fitted, view),
    }
    if options.tta:
        sections["tta"] = _tta_effect(boot, data.labels, chosen(SINGLE_MODE), chosen(TTA_MODE))
    sections["operating_points"] = _operating_points(data, probs, positive, class_names, stored.get("operating_points"),
                                                     mode_key(view, use_calibrated), boot)
    sections["subgroups"] = subgroup_results(data.labels, probs, data.groups, data.metadata, positive,
                                             options.resamples, options.seed)
    panels = [("before calibration", data.labels, data.raw[view])]
    if view in calibrated:
        panels.append((f"after (T = {temperatures[view]:.2f})", data.labels, calibrated[view]))
    return SectionResults(probs=probs, sections=_json_ready(sections), reliability=panels)


def _intervals(boot: LesionBootstrap, labels: np.ndarray, probs: np.ndarray,
               class_names: Sequence[str]) -> dict[str, Any]:
    samples = boot.metrics(labels, probs)
    present = np.bincount(labels, minlength=len(class_names)) > 0
    return {"test_balanced_accuracy": boot.interval(samples["balanced_accuracy"]),
            "test_accuracy": boot.interval(samples["accuracy"]), "test_auc": boot.interval(samples["auc"]),
            "recall": {name: boot.interval(samples["recall"][:, c]) if present[c] else None
                       for c, name in enumerate(class_names)}}


def _lesion_level(data: EvaluatedSet, probs: np.ndarray, class_names: Sequence[str],
                  options: SectionOptions) -> dict[str, Any] | None:
    if not has_lesion_ids(data.groups, data.image_ids):
        return None
    lesions = by_lesion(data.groups, data.labels, probs)
    boot = LesionBootstrap.draw(lesions.lesion_ids, options.resamples, options.seed)
    return {"n_lesions": int(len(lesions.labels)), "n_images": int(len(data.labels)),
            **classification_metrics(lesions.labels, lesions.probs, "test_"),
            "recall": {name: row["recall"] for name, row in
                       per_class_report(lesions.labels, lesions.probs, class_names).items()},
            "intervals": _intervals(boot, lesions.labels, lesions.probs, class_names)}


def _calibration(labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray | None, fitted: Mapping[str, Any],
                 view: str) -> dict[str, Any]:
    section: dict[str, Any] = {"view": view, "ece_bins": ECE_BINS, "before": calibration_metrics(labels, raw)}
    if calibrated is None:
        section["skipped"] = fitted.get("skipped") or (
            f"the model file holds no temperature for {view} prediction (core.final_train fits them on the "
            f"validation split)")
        return section
    return {**section, "temperature": fitted["temperature"][view], "fitted_on": fitted.get("fitted_on"),
            "n_fit_images": fitted.get("n_images"), "after": calibration_metrics(labels, calibrated)}


def _tta_effect(boot: LesionBootstrap, labels: np.ndarray, single: np.ndarray, tta: np.ndarray
                ) -> dict[str, Any]:
    """Both views' metrics and the paired difference (TTA - single), with intervals from the same resamples."""
    out: dict[str, Any] = {}
    for name, probs in (("without", single), ("with", tta)):
        out[name] = classification_metrics(labels, probs, "test_")
    out["difference"] = {key: out["with"][key] - out["without"][key] for key in INTERVAL_KEYS}
    without, with_ = boot.metrics(labels, single), boot.metrics(labels, tta)
    names = {"test_balanced_accuracy": "balanced_accuracy", "test_accuracy": "accuracy", "test_auc": "auc"}
    for key, name in names.items():
        out["without"][f"{key}_ci"] = boot.interval(without[name])
        out["with"][f"{key}_ci"] = boot.interval(with_[name])
        out["difference"][f"{key}_ci"] = boot.interval(with_[name] - without[name])
    return out


def _operating_points(data: EvaluatedSet, probs: np.ndarray, positive: int | None, class_names: Sequence[str],
                      stored: Mapping[str, Any] | None, mode: str, boot: LesionBootstrap) -> dict[str, Any] | None:
    if positive is None:
        return None
    name = class_names[positive]
    is_positive = data.labels == positive
    score = probs[:, positive]
    section: dict[str, Any] = {"positive_class": name, "mode": mode, "n_positive": int(is_positive.sum()),
                               "n_negative": int((~is_positive).sum()), "auc": None, "auc_ci": None}
    if 0 < is_positive.sum() < len(is_positive):
        section["auc"] = float(roc_auc_score(is_positive, score))
        section["auc_ci"] = boot.interval(boot.auc(is_positive, score))
    stored = stored or {}
    chosen = (stored.get("modes") or {}).get(mode)
    if stored.get("positive_class") != name or chosen is None:
        section["skipped"] = stored.get("skipped") or (
            f"the model file holds none for {name} ({mode} probabilities); core.final_train chooses them on the "
            f"validation split for its --positive-class (stored: {stored.get('positive_class') or 'none'})")
        return section
    section.update(chosen_on=stored.get("chosen_on"), val_auc=chosen["auc"], val_n_positive=stored.get("n_positive"))
    applied = apply_thresholds(chosen["points"], is_positive, score, boot)
    section["points"] = [{"kind": row["kind"], "target": row["target"], "threshold": row["threshold"],
                          "val_sensitivity": row["sensitivity"], "val_specificity": row["specificity"], **test}
                         for row, test in zip(chosen["points"], applied)]
    return section


def _json_ready(value: object) -> Any:
    """NaN -> None (JSON has no NaN), numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value
