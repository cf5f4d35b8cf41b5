"""The sweep page's ensemble section (sweep/report.py): what ensemble.json holds (core/ensemble_file.py), as a
table: the best run alone and the ensemble on the validation split, the members with their picks and weights,
the greedy steps, and the candidates. Not a command.
"""

from __future__ import annotations

import html
from pathlib import Path

from core import filenames
from core.errors import UserError


def ensemble_section(folder: Path, settings: dict) -> str:
    """The section's HTML; a note where the sweep chose no ensemble (or ensemble.json cannot be read)."""
    from core.ensemble_file import read_ensemble_choice

    path = folder / filenames.ENSEMBLE_CHOICE
    size = settings.get("ensemble_size", 5)
    if not path.is_file():
        why = ("turned off (--ensemble-size 1)" if size == 1 else
               "none yet: chosen after the confirmation stage, among two or more full-length runs")
        return f'<p class="muted">Ensemble: {html.escape(why)}.</p>'
    try:
        choice = read_ensemble_choice(path)
    except UserError as exc:
        return f'<p class="muted">{html.escape(str(exc))}</p>'
    doc = choice.document
    metric = html.escape(choice.metric_name)
    rows = [("chosen by", f"greedy forward selection with replacement over {len(doc['candidates'])} full-length runs, "
                          f"up to {choice.max_size} picks, on {metric} of the validation split "
                          f"({doc['n_val_images']} images); {html.escape(doc['stopped'])}"),
            (f"best run alone ({metric})", f"{choice.best_single_value:.4f} ({_link(choice.best_single_id)})"),
            (f"ensemble ({metric})", f"{choice.ensemble_value:.4f}"),
            ("model", f"<code>python -m core.final_train {html.escape(str(folder / filenames.BEST_TRIAL))}</code> "
                      f"builds "
                      f"<code>{filenames.FINAL_DIR}/{filenames.ENSEMBLE_MODEL}</code> from the members' best.pt"
             if choice.is_ensemble else "none: no run improved on the best run alone, so core.final_train trains "
                                        "the single model only")]
    out = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"
    out += "<h3>members</h3><table><tr><th>trial</th><th>role</th><th>picks</th><th>weight</th></tr>" + "".join(
        f"<tr><td>{_link(m.trial_id)}</td><td>{html.escape(m.role)}</td><td>{m.count}</td><td>{m.weight:.3f}</td></tr>"
        for m in choice.members) + "</table>"
    out += "<h3>greedy steps</h3><table><tr><th>pick</th><th>added</th><th>" + metric + "</th></tr>" + "".join(
        f"<tr><td>{i}</td><td>{_link(s['added'])}</td><td>{s['value']:.4f}</td></tr>"
        for i, s in enumerate(doc["steps"], 1)) + "</table>"
    return out


def _link(trial_id: str) -> str:
    return f'<a href="trials/{html.escape(trial_id)}/">{html.escape(trial_id)}</a>'
