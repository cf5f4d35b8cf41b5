"""``report.md`` and ``report.html``: the page a user reads first after ``core.final_train`` or ``core.evaluate``.

It holds what the run was (source, data, split sizes, training), the test metrics (with their 95%
intervals, ``0.640 [0.61, 0.67]``), the per-class table, further tables (lesion level, calibration, TTA,
operating points, subgroups: core/evaluation/sections.py), the figures and the configuration. Both files come from
one :class:`ReportInput`: report.md links the figure files beside it; report.html embeds them (base64: the
diagrams as PNG, the Grad-CAM galleries as JPEG) so that the one file can be shared, and holds no script.
The sweep's page (sweep/report.py) embeds report.html's ``<article>`` as its final-model section, in slots that
:func:`show_in_parent_page` fills when core.final_train ends.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from core.explain import mask_scores
from core import filenames
from core.io.atomic import write_text

log = logging.getLogger(__name__)

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
    gradcam: Mapping[str, Any] | None = None        # the "gradcam" section of metrics.json (core.explain.gradcam)
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
    alarm = mask_scores.bias_note(doc.get("map_correlation"), masks_corr)
    if alarm:
        lines += [f"> {alarm}", ""]
    elif doc.get("map_correlation") is not None:
        masks = f", or above the lesion masks' own {masks_corr:.2f}" if masks_corr is not None else ""
        lines += [f"Position bias: the maps' mean pairwise correlation is {doc['map_correlation']:.2f} over the "
                  f"{doc['correlation_over']} (the alarm fires above {mask_scores.BIAS_ALARM}{masks}): no sign "
                  f"of maps that look alike whatever the image.", ""]
    if lesions:
        lines += [mask_scores.verdict(lesions), "",
                  "Scored against the lesion masks (white outlines on the overlays): energy inside = share of "
                  "the map inside the lesion; pointing = share of images whose map peaks inside the lesion.", ""]
        lines += mask_scores.table(lesions) + [""]
    return lines


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


def write_evaluation_report(path: str | os.PathLike, report: ReportInput) -> None:
    """report.md at ``path`` and report.html beside it, with the same content."""
    path = Path(path)
    write_text(path, render_report(report))
    write_text(path.parent / filenames.REPORT_HTML, render_report_html(report, path.parent))


# --- a page that shows a final training's report (the sweep's report.html) -----------------------------------
# Such a page, in the folder above the final training's, holds two slots: a link in its own text and the
# report's article. sweep/report.py writes them, filled by :func:`final_link` and :func:`final_section` (or its
# own words while there is no report yet); when core.final_train ends, :func:`show_in_parent_page` fills them
# in place, so the page shows the new model at once without core knowing what wrote it.
_SLOT = "<!-- final-report:{part}:{name}:{edge} -->"


def slot(part: str, final_name: str, content: str) -> str:
    """``content`` between the markers of slot ``part`` ('link' or 'section') for the final folder ``final_name``."""
    return (f"{_SLOT.format(part=part, name=final_name, edge='begin')}{content}"
            f"{_SLOT.format(part=part, name=final_name, edge='end')}")


def final_link() -> str:
    """The link slot's text once the final model's report is there."""
    return '<p>Retrained and tested: <a href="#final">the final model</a>.</p>'


def final_section(final_dir: str | os.PathLike) -> str | None:
    """The section slot's content: the article of ``final_dir``'s report.html; None while it has none."""
    final_dir = Path(final_dir)
    try:
        article = report_article((final_dir / filenames.REPORT_HTML).read_text(encoding="utf-8"))
    except OSError:
        return None
    if article is None:
        return None
    name = final_dir.name
    return (f'<p class="muted">From <a href="{name}/{filenames.REPORT_HTML}">{name}/{filenames.REPORT_HTML}</a> '
            f'(also <a href="{name}/{filenames.REPORT}">{name}/{filenames.REPORT}</a>).</p>\n{article}')


def show_in_parent_page(final_dir: str | os.PathLike, parent_dir: str | os.PathLike) -> bool:
    """Fill the slots of ``parent_dir``'s report.html with ``final_dir``'s report; False where it has none.

    The page is a view: a page without slots for ``final_dir`` (none there, one written before slots existed,
    or ``final_dir`` elsewhere) is left as it is, and the log says how to rewrite it.
    """
    final_dir, page = Path(final_dir), Path(parent_dir) / filenames.REPORT_HTML
    section = final_section(final_dir)
    text = None
    if section is not None and page.is_file() and final_dir.resolve().parent == page.parent.resolve():
        text = page.read_text(encoding="utf-8")
        for part, content in (("link", final_link()), ("section", section)):
            begin, end = (_SLOT.format(part=part, name=final_dir.name, edge=edge) for edge in ("begin", "end"))
            start, stop = text.find(begin), text.find(end)
            text = text[:start + len(begin)] + content + text[stop:] if 0 <= start < stop else None
            if text is None:
                break
    if text is None:
        log.info("%s does not show %s (no slot for it there); a sweep's page is rewritten with: python -m "
                 "sweep.report %s", page, final_dir, parent_dir)
        return False
    write_text(page, text)
    log.info("%s now shows %s", page, final_dir)
    return True


# --- report.html -----------------------------------------------------------------------------------------
# Shared with the sweep's page (sweep/report.py), which adds its own rules after these.
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; margin: 0;
       background: #f6f8fa; }
main { max-width: 1200px; margin: 0 auto; padding: 16px 28px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0.6em 0 0.3em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em;
margin-top: 1.6em; } h3 { margin-top: 1.2em; } h4 { margin: 1em 0 0.3em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.93em; }
th, td { border: 1px solid #d0d7de; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f0f3f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 0.9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f0f3f6;
            border-radius: 4px; } code { padding: 1px 4px; } pre { padding: 8px 12px; overflow-x: auto; }
ul.facts { padding-left: 1.2em; } ul.facts li { margin: 2px 0; }
blockquote { margin: 0.8em 0; padding: 6px 14px; border-left: 4px solid #d4a72c; background: #fff8c5; }
figure { margin: 0.8em 0 1.4em; } figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { font-weight: 600; margin-bottom: 4px; } .muted { color: #59636e; }
.galleries { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 0 24px; }
"""
# The sweep's page cuts the article out of a final training's report.html between these.
ARTICLE_BEGIN, ARTICLE_END = "<!-- report-article:begin -->", "<!-- report-article:end -->"
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def render_report_html(report: ReportInput, folder: str | os.PathLike) -> str:
    """A whole HTML page; ``folder`` is where the figure paths of ``report`` are relative to."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(report.title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
            f"{render_report_article(report, folder)}\n</main>\n</body>\n</html>\n")


def render_report_article(report: ReportInput, folder: str | os.PathLike, heading: int = 1) -> str:
    """The report as one ``<article>``; ``heading`` is the level of its title (the sweep's page uses 2)."""
    folder = Path(folder)

    def h(level: int, text: str, escape: bool = True) -> str:
        n = min(6, level + heading - 1)
        return f"<h{n}>{html.escape(text) if escape else text}</h{n}>"

    parts = [ARTICLE_BEGIN, '<article class="report">', h(1, report.title), '<ul class="facts">']
    parts += [f"<li><b>{html.escape(label)}:</b> {_inline(value)}</li>" for label, value in report.facts]
    parts += ["</ul>", h(2, "Test metrics"), "<table><tr><th>metric</th><th>value</th></tr>"]
    parts += [f'<tr><td>{html.escape(label)}</td><td class="num">'
              f'{with_interval(report.metrics.get(key), report.intervals.get(key))}</td></tr>'
              for key, label in HEADLINE_METRICS if key in report.metrics]
    parts.append("</table>")
    parts += [f'<p class="muted">{_inline(report.interval_note)}</p>'] if report.interval_note else []
    parts += [h(2, "Per class"),
              "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"]
    for name, row in report.per_class.items():
        recall = with_interval(row["recall"], report.intervals.get(f"recall/{name}"))
        parts.append(f'<tr><td>{html.escape(name)}</td><td class="num">{_number(row["precision"])}</td>'
                     f'<td class="num">{recall}</td><td class="num">{_number(row["f1"])}</td>'
                     f'<td class="num">{int(row["support"])}</td></tr>')
    parts += ["</table>", '<p class="muted">Recall of a class is the diagonal of the row-normalised confusion '
              "matrix; support is the number of evaluated images of the class.</p>"]
    parts += [f"<blockquote>{_inline(note)}</blockquote>" for note in report.notes]
    for table in report.tables:  # the same tables as report.md (render_table's lines after its heading)
        parts += [h(2, table.title), _markdown_html(render_table(table)[2:])]
    parts.append(h(2, "Figures"))
    parts += [_figure(caption, folder, path) for caption, path in report.figures]
    if report.galleries or report.gradcam:
        parts += [h(3, "Grad-CAM"), "<p>Heat maps of the predicted class on test images, per true class (correct "
                  "predictions and the most confident mistakes, titled in red). Each overlay is also in "
                  "<code>gradcam/&lt;class&gt;/</code>.</p>"]
        parts += [_markdown_html(_gradcam_lines(report.gradcam))] if report.gradcam else []
        parts.append('<div class="galleries">')
        parts += [_figure(name, folder, path, f"Grad-CAM, true class {name}", photo=True)
                  for name, path in report.galleries.items()]
        parts.append("</div>")
    if report.commands:
        parts.append(h(2, "Commands"))
        for what, command in report.commands:
            parts += [f"<p>{html.escape(what)}:</p>", f"<pre>{html.escape(command)}</pre>"]
    if report.config:
        parts += [h(2, "Configuration"), "<table><tr><th>key</th><th>value</th></tr>"]
        parts += [f"<tr><td>{html.escape(str(key))}</td><td><code>{html.escape(repr(value))}</code></td></tr>"
                  for key, value in report.config.items()]
        parts.append("</table>")
    parts += ["</article>", ARTICLE_END]
    return "\n".join(parts)


def report_article(page: str) -> str | None:
    """The ``<article>`` of a report.html written by :func:`write_evaluation_report`; None if it holds none."""
    start, end = page.find(ARTICLE_BEGIN), page.find(ARTICLE_END)
    return page[start:end + len(ARTICLE_END)] if 0 <= start < end else None


def _figure(caption: str, folder: Path, path: str, alt: str | None = None, photo: bool = False) -> str:
    """A figure file embedded as a data: URI (the page stays one file); a missing file is said so."""
    file = folder / path
    try:
        mime, data = _embedded(file, photo)
    except OSError:
        return f'<figure><figcaption>{html.escape(caption)}</figcaption><p class="muted">missing: ' \
               f"<code>{html.escape(path)}</code></p></figure>"
    return (f'<figure><figcaption>{html.escape(caption)}</figcaption><img alt="{html.escape(alt or caption)}" '
            f'src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}"></figure>')


def _embedded(file: Path, photo: bool) -> tuple[str, bytes]:
    """(MIME type, bytes) of a figure. Photographs (the Grad-CAM galleries, about 0.6 MB each as PNG) go in as
    JPEG: about a fifth of the size, which keeps a report with seven galleries small enough to mail."""
    data = file.read_bytes()
    if not (photo and file.suffix.lower() == ".png"):
        return _MIME.get(file.suffix.lower(), "application/octet-stream"), data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGBA")
        flat = Image.new("RGB", image.size, "white")
        flat.paste(image, mask=image.getchannel("A"))
    out = io.BytesIO()
    flat.save(out, format="JPEG", quality=88)
    return "image/jpeg", out.getvalue()


def _markdown_html(lines: list[str]) -> str:
    """Markdown lines (paragraphs, quotes, pipe tables) as HTML: the sections report.md and report.html share.

    ``markdown`` comes with TensorBoard; raw HTML in the text is escaped, as everywhere on the page."""
    import markdown

    text = "\n".join(line.replace("<", "&lt;").replace(">", "&gt;") if not line.startswith(">") else
                     "> " + line[1:].lstrip().replace("<", "&lt;").replace(">", "&gt;") for line in lines)
    return markdown.markdown(text, extensions=["tables"])


def _inline(text: str) -> str:
    """The Markdown the facts and notes use (`code`, **bold**) as HTML; everything else escaped."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"
