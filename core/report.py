"""``report.md``: the page a user reads first after ``core.final_train`` or ``core.evaluate``.

It holds what the run was (source, data, split sizes, training), the test metrics, the per-class
table, the figures (embedded, so a Markdown viewer shows them) and the configuration.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from core.atomic import write_text

HEADLINE_METRICS = (("test_balanced_accuracy", "balanced accuracy (mean recall)"), ("test_accuracy", "accuracy"),
                    ("test_macro_f1", "macro F1"), ("test_auc", "macro ROC AUC (one vs rest)"),
                    ("test_loss", "cross-entropy loss"))


@dataclass(frozen=True)
class ReportInput:
    """Everything the report shows; figure paths are relative to the report's folder."""

    title: str
    facts: Sequence[tuple[str, str]]                # (label, value) lines under the title
    metrics: Mapping[str, float | None]             # test_* metrics
    per_class: Mapping[str, Mapping[str, float]]    # class -> precision, recall, f1, support
    figures: Sequence[tuple[str, str]]              # (caption, relative path)
    galleries: Mapping[str, str] = field(default_factory=dict)   # class -> relative path
    config: Mapping[str, Any] | None = None
    notes: Sequence[str] = ()
    commands: Sequence[tuple[str, str]] = ()        # (what it does, shell command)
    gradcam: Mapping[str, Any] | None = None        # the "gradcam" section of metrics.json (core.gradcam)


def render_report(report: ReportInput) -> str:
    lines = [f"# {report.title}", ""]
    lines += [f"- **{label}:** {value}" for label, value in report.facts]
    lines += ["", "## Test metrics", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {label} | {_number(report.metrics.get(key))} |" for key, label in HEADLINE_METRICS
              if key in report.metrics]
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, row in report.per_class.items():
        lines.append(f"| {name} | {_number(row['precision'])} | {_number(row['recall'])} | {_number(row['f1'])} "
                     f"| {int(row['support'])} |")
    lines += ["", "Recall of a class is the diagonal of the row-normalised confusion matrix; support is the "
              "number of evaluated images of the class.", ""]
    for note in report.notes:
        lines += [f"> {note}", ""]
    lines += ["## Figures", ""]
    for caption, path in report.figures:
        lines += [f"### {caption}", "", f"![{caption}]({path})", ""]
    if report.galleries or report.gradcam:
        lines += ["### Grad-CAM", "",
                  "Heat maps of the predicted class on test images, per true class (correct predictions and "
                  "the most confident mistakes, titled in red). Each overlay is also in `gradcam/<class>/`.", ""]
        lines += _gradcam_lines(report.gradcam) if report.gradcam else []
        for name, path in report.galleries.items():
            lines += [f"#### {name}", "", f"![Grad-CAM, true class {name}]({path})", ""]
    if report.commands:
        lines += ["## Commands", ""]
        for what, command in report.commands:
            lines += [f"{what}:", "", "```", command, "```", ""]
    if report.config:
        lines += ["## Configuration", "", "| key | value |", "|---|---|"]
        lines += [f"| {key} | `{value!r}` |" for key, value in report.config.items()]
        lines.append("")
    return "\n".join(lines)


def _gradcam_lines(doc: Mapping[str, Any]) -> list[str]:
    """The maps' method and layer, the position-bias alarm in words, and the scores against lesion masks."""
    from core import explain_scores

    chosen = doc.get("layer_chosen_by") == "--gradcam-layer"
    grid = f"its map is {doc['map_side']}x{doc['map_side']} at {doc['image_size']} px"
    if doc["method"] == "GuidedGradCam":
        why = "chosen with `--gradcam-layer`" if chosen else "the last stage, the default of Guided Grad-CAM"
        lines = [f"Maps: Captum GuidedGradCam, guided backpropagation (pixel by pixel) times the Grad-CAM of "
                 f"**{doc['layer']}** ({why}; {grid}). `--gradcam-method gradcam` gives plain Grad-CAM.", ""]
    else:
        why = ("chosen with `--gradcam-layer`" if chosen
               else "the deepest stage with at least 7x7 cells at this size; `--gradcam-layer` chooses another")
        lines = [f"Maps: Captum LayerGradCam on **{doc['layer']}** ({why}; {grid}), bilinearly upsampled.", ""]
    lesions = doc.get("lesion_masks")
    masks_corr = lesions["overall"]["masks"]["map_correlation"] if lesions else None
    alarm = explain_scores.bias_note(doc.get("map_correlation"), masks_corr)
    if alarm:
        lines += [f"> {alarm}", ""]
    elif doc.get("map_correlation") is not None:
        masks = f", or above the lesion masks' own {masks_corr:.2f}" if masks_corr is not None else ""
        lines += [f"Position bias: the maps' mean pairwise correlation is {doc['map_correlation']:.2f} over the "
                  f"{doc['correlation_over']} (the alarm fires above {explain_scores.BIAS_ALARM}{masks}): no sign "
                  f"of maps that look alike whatever the image.", ""]
    if lesions:
        lines += [explain_scores.verdict(lesions), "",
                  "Scored against the lesion masks (white outlines on the overlays): energy inside = share of "
                  "the map inside the lesion; pointing = share of images whose map peaks inside the lesion.", ""]
        lines += explain_scores.table(lesions) + [""]
    return lines


def write_report(path: str | os.PathLike, report: ReportInput) -> None:
    write_text(path, render_report(report))


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"
