"""The report's tables of an evaluation's sections (core/evaluation/sections.py computes them), read back from
the metrics.json document, so that report.md, report.html and the file never disagree.

Not a command: core/evaluation/pipeline.py passes :func:`report_tables`, :func:`headline_intervals` and
:func:`interval_note` to core/evaluation/report.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from core.evaluation.sections import INTERVAL_KEYS
from core.model.inference import TTA_MODE
from core.evaluation.report import Table, with_interval
from core.evaluation.subgroups import MIN_LESIONS
from core.metric_names import label as metric_label


def headline_intervals(document: Mapping[str, Any]) -> dict[str, Any]:
    """The intervals of the headline metrics and per-class recalls, keyed as core/evaluation/report.py shows them."""
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
    labels = [(key, metric_label(key)) for key in ("test_balanced_accuracy", "test_accuracy", "test_auc", "test_macro_f1")]
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
    labels = [(key, metric_label(key)) for key in ("test_balanced_accuracy", "test_accuracy", "test_auc")]
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
