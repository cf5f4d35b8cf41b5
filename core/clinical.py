"""What an evaluation reports beyond the headline metrics: calibration, TTA, lesion level, intervals,
operating points and subgroups. core.final_train and core.evaluate both go through here, so their
metrics.json and report.md carry the same sections.

- ``fit_on_val`` (core.final_train only): the calibration temperatures (core/calibration.py) and the
  operating thresholds of the positive class (core/operating_points.py), chosen on the validation split
  and stored in model.pt. Never on test, never on training images (``not_fitted`` says why not).
- ``evaluate_clinically``: on the evaluated images (the test split, or an external set), with what model.pt
  stores; returns the probabilities the headline metrics use and the metrics.json sections.
- ``report_tables``: the report.md tables of those sections, read back from the metrics.json document.

Prediction modes: a view (``single``, or ``tta``: core/tta.py) and calibrated or raw; the headline uses
the asked view, calibrated where model.pt has its temperature unless ``--no-calibration``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from core.bootstrap import DEFAULT_RESAMPLES, LEVEL, LesionBootstrap
from core.calibration import ECE_BINS, TEMPERATURE_BOUNDS, apply_temperature, calibration_metrics, fit_temperature
from core.inference import SINGLE_MODE, TTA_MODE
from core.lesions import by_lesion, has_lesion_ids
from core.metrics import classification_metrics, per_class_report
from core.operating_points import apply_thresholds, choose_thresholds, positive_index
from core.report import Table, with_interval
from core.subgroups import MIN_LESIONS, subgroup_results

INTERVAL_KEYS = ("test_balanced_accuracy", "test_accuracy", "test_auc")
RELIABILITY_FIGURE = "reliability_diagram.png"


@dataclass(frozen=True)
class ClinicalOptions:
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
class Clinical:
    probs: np.ndarray                     # what the headline metrics use
    sections: dict[str, Any]              # metrics.json sections (JSON-ready: no NaN)
    reliability: list[tuple[str, np.ndarray, np.ndarray]]   # the reliability diagram's panels


def mode_key(view: str, calibrated: bool) -> str:
    return f"{view}/{'calibrated' if calibrated else 'raw'}"


def predict_set(loaded: Any, images: np.ndarray, data: Any, idx: np.ndarray, labels: np.ndarray,
                tta: bool) -> EvaluatedSet:
    """The raw probabilities of a model (core/inference.py's LoadedModel) for ``images`` = ``data.images[idx]``.

    ``labels``: theirs, as indices into the model's classes; ``tta``: predict the TTA view as well.
    """
    views = (SINGLE_MODE, TTA_MODE) if tta else (SINGLE_MODE,)
    encoded = loaded.encode_dataset(data, idx)  # the clinical metadata a metadata model takes; else None
    raw = {view: loaded.predict(images, tta=view == TTA_MODE, calibrated=False, metadata=encoded) for view in views}
    metadata = None if data.metadata is None else data.metadata.iloc[idx].reset_index(drop=True)
    return EvaluatedSet(labels=np.asarray(labels, dtype=np.int64), groups=data.groups[idx],
                        image_ids=data.image_ids[idx], metadata=metadata, raw=raw)


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

def evaluate_clinically(data: EvaluatedSet, class_names: Sequence[str], stored: Mapping[str, Any],
                        options: ClinicalOptions) -> Clinical:
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
    return Clinical(probs=probs, sections=_json_ready(sections), reliability=panels)


def _intervals(boot: LesionBootstrap, labels: np.ndarray, probs: np.ndarray,
               class_names: Sequence[str]) -> dict[str, Any]:
    samples = boot.metrics(labels, probs)
    present = np.bincount(labels, minlength=len(class_names)) > 0
    return {"test_balanced_accuracy": boot.interval(samples["balanced_accuracy"]),
            "test_accuracy": boot.interval(samples["accuracy"]), "test_auc": boot.interval(samples["auc"]),
            "recall": {name: boot.interval(samples["recall"][:, c]) if present[c] else None
                       for c, name in enumerate(class_names)}}


def _lesion_level(data: EvaluatedSet, probs: np.ndarray, class_names: Sequence[str],
                  options: ClinicalOptions) -> dict[str, Any] | None:
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


def _json_ready(value: Any) -> Any:
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


# --- report.md ---------------------------------------------------------------------------------------------

def headline_intervals(document: Mapping[str, Any]) -> dict[str, Any]:
    """The intervals of the headline metrics and per-class recalls, keyed as core/report.py shows them."""
    intervals = document.get("intervals") or {}
    out = {key: intervals.get(key) for key in INTERVAL_KEYS}
    out.update({f"recall/{name}": value for name, value in (intervals.get("recall") or {}).items()})
    return out


def interval_note(document: Mapping[str, Any]) -> str:
    boot = document.get("bootstrap") or {}
    prediction = document.get("prediction") or {}
    view = ("test-time augmentation (the mean of 8 flips and quarter turns)" if prediction.get("view") == TTA_MODE
            else "single view")
    calibration = (f"calibrated (temperature {prediction['temperature']:.3f})" if prediction.get("calibrated")
                   else "not calibrated")
    how = f"{view}, {calibration}"
    if not boot.get("resamples"):
        return f"Predictions: {how}. No confidence intervals (--bootstrap 0)."
    return (f"Predictions: {how}. In brackets: {boot['level']:.0%} confidence interval, percentile bootstrap over "
            f"{boot['units']} {boot['unit']}s ({boot['resamples']} resamples, seed {boot['seed']}).")


def report_tables(document: Mapping[str, Any]) -> list[Table]:
    """Lesion level, calibration, TTA, operating points and subgroups, from the metrics.json document."""
    tables = [_lesion_table(document), _calibration_table(document.get("calibration")),
              _tta_table(document.get("tta")), _operating_points_table(document.get("operating_points"))]
    positive = (document.get("prediction") or {}).get("positive_class")
    tables += _subgroup_tables(document.get("subgroups") or {}, positive)
    return [table for table in tables if table is not None]


def _lesion_table(document: Mapping[str, Any]) -> Table | None:
    lesion = document.get("lesion_level")
    if not lesion:
        return None
    image_iv, lesion_iv = document.get("intervals") or {}, lesion.get("intervals") or {}
    labels = (("test_balanced_accuracy", "balanced accuracy"), ("test_accuracy", "accuracy"),
              ("test_auc", "macro ROC AUC"), ("test_macro_f1", "macro F1"))
    rows = [[label, with_interval(document.get(key), image_iv.get(key)),
             with_interval(lesion.get(key), lesion_iv.get(key))] for key, label in labels]
    image_recall, lesion_recall = image_iv.get("recall") or {}, lesion_iv.get("recall") or {}
    for name, recall in lesion["recall"].items():
        image_value = (document.get("per_class") or {}).get(name, {}).get("recall")
        rows.append([f"recall {name}", with_interval(image_value, image_recall.get(name)),
                     with_interval(recall, lesion_recall.get(name))])
    return Table("Image level and lesion level", ["metric", f"images (n={lesion['n_images']})",
                                                  f"lesions (n={lesion['n_lesions']})"], rows,
                 intro="Lesion level: one prediction per lesion, the mean of the probabilities of its images.")


def _calibration_table(section: Mapping[str, Any] | None) -> Table | None:
    if not section:
        return None
    rows = [["before (raw model)", *(f"{section['before'][k]:.4f}" for k in ("ece", "brier", "nll"))]]
    if "after" in section:
        rows.append([f"after (temperature {section['temperature']:.3f})",
                     *(f"{section['after'][k]:.4f}" for k in ("ece", "brier", "nll"))])
        intro = (f"Temperature scaling fitted on the {section['fitted_on']} split ({section['n_fit_images']} images, "
                 f"minimum NLL); it never changes the predicted class.")
    else:
        intro = f"Not calibrated: {section['skipped']}."
    return Table(f"Calibration ({'TTA' if section['view'] == TTA_MODE else 'single view'})",
                 ["probabilities", f"ECE ({section['ece_bins']} bins, top label)", "Brier (multi-class)", "NLL"],
                 rows, intro=intro, notes=["The reliability diagram is under Figures."])


def _tta_table(section: Mapping[str, Any] | None) -> Table | None:
    if not section:
        return None
    labels = (("test_balanced_accuracy", "balanced accuracy"), ("test_accuracy", "accuracy"),
              ("test_auc", "macro ROC AUC"))
    rows = [[label, with_interval(section["without"][key], section["without"].get(f"{key}_ci")),
             with_interval(section["with"][key], section["with"].get(f"{key}_ci")),
             _signed(section["difference"][key], section["difference"].get(f"{key}_ci"))] for key, label in labels]
    return Table("Test-time augmentation", ["metric", "without TTA", "with TTA (8 views)", "difference"], rows,
                 intro="The mean softmax over the 8 flips and quarter turns of each image, against the image alone "
                       "(each calibrated with its own temperature where the model has them); the difference's "
                       "interval comes from the same resamples.")


def _operating_points_table(section: Mapping[str, Any] | None) -> Table | None:
    if not section:
        return None
    name = section["positive_class"]
    auc = with_interval(section.get("auc"), section.get("auc_ci"))
    if "points" not in section:
        return Table(f"Operating points: {name} vs the rest", ["", "value"], [["ROC AUC (test)", auc]],
                     intro=f"No operating thresholds: {section['skipped']}.")
    rows = []
    for point in section["points"]:
        what = ("sensitivity at specificity" if point["kind"] == "sensitivity_at_specificity"
                else "specificity at sensitivity")
        rows.append([f"{what} {point['target']:.2f}", f"{point['threshold']:.4f}",
                     f"{point['val_sensitivity']:.3f}", f"{point['val_specificity']:.3f}",
                     with_interval(point["sensitivity"], point.get("sensitivity_ci")),
                     with_interval(point["specificity"], point.get("specificity_ci"))])
    return Table(f"Operating points: {name} vs the rest",
                 ["target", "threshold", "val sensitivity", "val specificity", "test sensitivity", "test specificity"],
                 rows, intro=(f"ROC AUC of {name}: {auc} here, {section['val_auc']:.3f} on val. Thresholds on the "
                              f"probability of {name}, chosen on the {section['chosen_on']} split "
                              f"({section['val_n_positive']} {name} images) and applied unchanged here "
                              f"({section['n_positive']} {name} images, {section['n_negative']} others)."))


def _subgroup_tables(subgroups: Mapping[str, Sequence[Mapping[str, Any]]], positive: str | None) -> list[Table]:
    tables = []
    for variable, rows in subgroups.items():
        scored = [row for row in rows if not row["too_small"]]
        small = [f"{row['group']} ({row['n_lesions']})" for row in rows if row["too_small"]]
        header = ["group", "images", "lesions", "balanced accuracy"]
        if positive:
            header += [f"{positive} lesions", f"{positive} sensitivity"]
        table_rows = []
        for row in scored:
            cells = [row["group"], str(row["n_images"]), str(row["n_lesions"]),
                     with_interval(row["balanced_accuracy"], row["balanced_accuracy_ci"])]
            if positive:
                cells += [str(row["n_positive_lesions"]), with_interval(row["sensitivity"], row["sensitivity_ci"])]
            table_rows.append(cells)
        notes = [f"Too small to score (fewer than {MIN_LESIONS} lesions): {', '.join(small)}."] if small else []
        tables.append(Table(f"Subgroup: {variable}", header, table_rows, notes=notes))
    if tables:
        tables[0] = replace(tables[0], intro=(
            "Per group of the dataset's metadata: balanced accuracy over the classes present in the group"
            + (f", and the share of its {positive} images predicted as {positive}" if positive else "")
            + "; intervals by bootstrap over the group's lesions."))
    return tables


def _signed(value: float | None, interval: Sequence[float] | None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.3f}"
    return text if interval is None else f"{text} [{interval[0]:+.2f}, {interval[1]:+.2f}]"


def write_reliability(out: Any, clinical: Clinical, what: str) -> tuple[str, str]:
    """The reliability diagram (before and after calibration) into ``out``; returns its (caption, file)."""
    from core.figures import reliability_figure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        reliability_figure(clinical.reliability, out / RELIABILITY_FIGURE, title=f"Reliability diagram, {what}")
    return "Reliability diagram (before and after calibration)", RELIABILITY_FIGURE
