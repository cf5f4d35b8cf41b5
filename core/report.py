"""``report.md``: the page a user reads first after ``core.final_train`` or ``core.evaluate``.

It holds what the run was (source, data, split sizes, training), the test metrics (with their 95%
intervals, ``0.640 [0.61, 0.67]``), the per-class table, further tables (lesion level, calibration, TTA,
operating points, subgroups: core/clinical.py), the figures (embedded, so a Markdown viewer shows them)
and the configuration.
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
class Table:
    """A titled table of pre-formatted cells, with a sentence before it and notes after it."""

    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    intro: str = ""
    notes: Sequence[str] = ()


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
    intervals: Mapping[str, Sequence[float] | None] = field(default_factory=dict)  # test_* or recall/<class>
    interval_note: str = ""                         # how the intervals were made
    tables: Sequence[Table] = ()


def render_report(report: ReportInput) -> str:
    lines = [f"# {report.title}", ""]
    lines += [f"- **{label}:** {value}" for label, value in report.facts]
    lines += ["", "## Test metrics", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {label} | {with_interval(report.metrics.get(key), report.intervals.get(key))} |"
              for key, label in HEADLINE_METRICS if key in report.metrics]
    if report.interval_note:
        lines += ["", report.interval_note]
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, row in report.per_class.items():
        recall = with_interval(row["recall"], report.intervals.get(f"recall/{name}"))
        lines.append(f"| {name} | {_number(row['precision'])} | {recall} | {_number(row['f1'])} "
                     f"| {int(row['support'])} |")
    lines += ["", "Recall of a class is the diagonal of the row-normalised confusion matrix; support is the "
              "number of evaluated images of the class.", ""]
    for note in report.notes:
        lines += [f"> {note}", ""]
    for table in report.tables:
        lines += render_table(table)
    lines += ["## Figures", ""]
    for caption, path in report.figures:
        lines += [f"### {caption}", "", f"![{caption}]({path})", ""]
    if report.galleries:
        lines += ["### Grad-CAM", "",
                  "Heat maps of the predicted class on test images, per true class (correct predictions and "
                  "the most confident mistakes, titled in red). Each overlay is also in `gradcam/<class>/`.", ""]
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


def render_table(table: Table) -> list[str]:
    lines = [f"## {table.title}", ""] + ([table.intro, ""] if table.intro else [])
    if table.rows:
        align = ["---"] + ["---:"] * (len(table.header) - 1)  # labels left, figures right
        lines += ["| " + " | ".join(table.header) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        lines.append("")
    for note in table.notes:
        lines += [note, ""]
    return lines


def with_interval(value: float | None, interval: Sequence[float] | None) -> str:
    """``0.640 [0.61, 0.67]``; the value alone (4 decimals) when there is no interval."""
    if interval is None or value is None or (isinstance(value, float) and math.isnan(value)):
        return _number(value)
    return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def write_report(path: str | os.PathLike, report: ReportInput) -> None:
    write_text(path, render_report(report))


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"
