"""``results/<sweep>/report.html``: one self-contained page to look at a sweep (and its final model).

    python -m sweep.report results/<sweep>

``python -m sweep.run`` writes it at the end of every sweep and of every ``--resume``, and
``python -m core.final_train`` fills its final-model slots when it ends (core/evaluation/report.py). Run the
command to see a sweep that is still running (running trials are shown as such; files not yet
written are skipped).

The page holds the sweep's facts (data, split sizes, space, budget, wall time, trial-hours,
GPU-hours, trial states), Optuna's own figures (optimisation history, parameter importances,
parallel coordinates, slice plots of the most important parameters; plotly, from optuna.db), the
learning curves of every trial with its early stop marked (from each trial's metrics.csv), the
top trials (a sortable table linking each trial's folder and TensorBoard run), the best trial
(best.json, with its confirmation runs where the sweep made them) and, after
``core.final_train``, the final model's report (test metrics, figures, Grad-CAM galleries).

Self-contained: plotly.js (about 4.8 MB) is inlined once, the data of every figure and the final
model's images are inline; nothing is fetched, so the file opens offline, mailed or attached.
Large sweeps: the learning curves are drawn as one line trace per trial state (the trials of a
state joined with gaps) plus the five best trials on their own, so the page's size and drawing
time grow with the number of epochs, not of traces; the table lists the best TOP_ROWS trials
(trials.csv has them all); the parallel coordinates and slice plots show the most important
parameters only. ``python -m bench.report_size`` measures a generated 500-trial sweep.
"""

from __future__ import annotations

import argparse
import html
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pandas as pd

from core.io import atomic, state_files
from core import filenames
from core.errors import UserError, run_cli
from core.metric_names import DEFAULT_METRIC, finite_or_none
from core.filenames import BEST_TRIAL, FINAL_DIR
from core.evaluation.report import STYLE, final_link, final_section, slot
from sweep.ensemble_page import ensemble_section
from sweep.outputs import duration_text, read_trials, trials_frame
from sweep.settings import SETTINGS_FILE, SPACE_COPY, SweepSettings, flag, metric_mode, read_settings_file
from sweep.space import parse_space

if TYPE_CHECKING:
    import plotly.graph_objects as go

log = logging.getLogger(__name__)

REPORT_FILE = filenames.REPORT_HTML
TOP_ROWS = 100                 # rows of the trials table (all of them are in trials.csv)
TOP_CURVES = 5                 # best trials drawn as their own, named learning curves
SLICE_PARAMS = 3               # slice plots of the most important parameters
PARALLEL_PARAMS = 8            # parallel coordinates: the most important parameters
TENSORBOARD_URL = "http://localhost:6006/"   # where `tensorboard --logdir results/<sweep>` serves
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
# Trial states on the page; trials.csv's status (sweep/outputs.py) and Optuna's states map onto them.
STATES = ("complete", "stopped early", "failed", "running")
_STATE_OF = {"completed": "complete", "complete": "complete", "stopped early": "stopped early",
             "stopped": "stopped early", "pruned": "stopped early", "failed": "failed", "fail": "failed",
             "error": "failed", "running": "running", "pending": "running", "waiting": "running"}
_COLOURS = {"complete": "#6b8fb3", "stopped early": "#9a9a9a", "failed": "#d62728", "running": "#e08a2e",
            "confirmation": "#2ca02c"}
_TOP_COLOURS = ("#4b0082", "#c71585", "#008b8b", "#b8860b", "#1e3a8a")   # the best trials: apart from the above


@dataclass
class SweepFolder:
    """What the page is drawn from; files a running sweep has not written yet are None or empty."""

    folder: Path
    doc: dict[str, Any]                          # sweep.json
    settings: dict[str, Any]
    space: Any | None                            # sweep.space.SearchSpace
    trials: pd.DataFrame                         # trials.csv (+ trials only trial.json knows), `state`, `role`
    records: dict[str, dict[str, Any]]           # trials/<id>/trial.json
    best: dict[str, Any] | None
    study: Any | None                            # optuna.Study (read-only)
    notes: list[str] = field(default_factory=list)   # what could not be read, said on the page

    @property
    def metric(self) -> str:
        return self.settings.get("metric") or DEFAULT_METRIC

    @property
    def mode(self) -> str:
        return metric_mode(self.metric)

    @property
    def param_names(self) -> tuple[str, ...]:
        if self.space is not None:
            return tuple(self.space.names)
        return tuple(k for r in self.records.values() for k in (r.get("params") or {}))


# --- reading the folder ----------------------------------------------------------------------------------
def is_sweep(folder: str | Path) -> bool:
    return (Path(folder) / SETTINGS_FILE).is_file()


def read_sweep(folder: str | Path) -> SweepFolder:
    """Read what there is of a sweep folder; only a missing or unreadable sweep.json is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    if not is_sweep(folder):
        raise UserError(f"{folder}: not a sweep folder (no {SETTINGS_FILE}; python -m sweep.run writes one)")
    doc = read_settings_file(folder, "no such file")
    if not isinstance(doc.get("settings"), dict):
        raise UserError(f"{folder / SETTINGS_FILE}: not a sweep settings file")
    settings = doc["settings"]
    notes: list[str] = []
    space = None
    try:
        space = parse_space((folder / SPACE_COPY).read_text(encoding="utf-8"), source=SPACE_COPY)
    except (OSError, UserError) as exc:
        notes.append(f"{SPACE_COPY} not read: {exc}")

    records = {}
    try:
        records = {r["trial_id"]: r for r in read_trials(folder)}
    except (OSError, ValueError, KeyError) as exc:  # a trial.json being replaced right now
        notes.append(f"trial records not all read: {exc}")
    metric = settings.get("metric") or DEFAULT_METRIC
    mode = metric_mode(metric)
    names = tuple(space.names) if space is not None else ()
    table = None
    if (folder / filenames.TRIALS_CSV).is_file():
        try:
            table = pd.read_csv(folder / filenames.TRIALS_CSV, dtype={"trial_id": str})
        except (OSError, ValueError) as exc:
            notes.append(f"trials.csv not read: {exc}")
    # Trials that started after trials.csv was last written (it is rewritten at each trial's end).
    unlisted = [r for tid, r in records.items() if table is None or tid not in set(table["trial_id"])]
    if unlisted or table is None:
        extra = trials_frame(unlisted, names, metric, mode)
        table = extra if table is None else pd.concat([table, extra], ignore_index=True)
    table = _with_state(table, records)

    best = None
    if (folder / BEST_TRIAL).is_file():
        try:
            best = state_files.read_json_object(folder / BEST_TRIAL, "no such file")
        except UserError as exc:
            notes.append(str(exc))
    study = _read_study(folder, settings.get("name") or folder.name, notes)
    return SweepFolder(folder=folder, doc=doc, settings=settings, space=space, trials=table, records=records, best=best,
                 study=study, notes=notes)


def _with_state(table: pd.DataFrame, records: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Add `state` (one of STATES) and `role` (search / confirm; trials.csv before confirmation had none)."""
    table = table.copy()
    if "role" not in table:
        table["role"] = "search"
    table["role"] = table["role"].fillna("search").astype(str)
    status = table["status"].astype(str).str.lower()
    # trial.json is rewritten as a trial ends, trials.csv only after it: the record is the fresher one.
    fresher = table["trial_id"].map(lambda t: (records.get(t) or {}).get("status"))
    status = fresher.fillna(status).astype(str).str.lower()
    table["state"] = status.map(lambda s: _STATE_OF.get(s, "running" if s in ("", "nan", "none") else s))
    return table


def _read_study(folder: Path, name: str, notes: list[str]) -> Any | None:
    """optuna.db opened read-only (the sweep may be writing it); None where it is not there yet."""
    path = folder / filenames.OPTUNA_DB
    if not path.is_file():
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///file:{path.resolve()}?mode=ro&uri=true")
        names = optuna.study.get_all_study_names(storage)
        if name not in names and len(names) == 1:
            name = names[0]
        return optuna.load_study(study_name=name, storage=storage)
    except Exception as exc:  # noqa: BLE001 - a locked, half-created or foreign db: the page says so
        notes.append(f"optuna.db not read: {type(exc).__name__}: {exc}")
        return None


# --- the page ----------------------------------------------------------------------------------------------
def render(sweep: SweepFolder, now: float | None = None) -> str:
    """The whole page as text."""
    from plotly.offline import get_plotlyjs

    now = time.time() if now is None else now
    name = sweep.settings.get("name") or sweep.folder.name
    figures = Figures(sweep)
    sections = [
        ("facts", "The sweep", _facts_section(sweep, now)),
        ("best", "Best trial", _best_section(sweep)),
        ("ensemble", "Ensemble", ensemble_section(sweep.folder, sweep.settings)),   # sweep/ensemble_page.py
        ("history", "Optimisation history", figures.history()),
        ("importances", "Parameter importances", figures.importances()),
        ("parallel", "Parallel coordinates", figures.parallel()),
        ("slices", "Slice plots of the most important parameters", figures.slices()),
        ("curves", f"Learning curves: {sweep.metric} by epoch", figures.curves()),
        ("trials", "Top trials", _trials_section(sweep)),
        ("final", "Final model", _final_section(sweep)),
    ]
    running = int((sweep.trials["state"] == "running").sum())
    status = (f"{running} trial(s) running when this page was made: run <code>python -m sweep.report "
              f"{html.escape(str(sweep.folder))}</code> again to refresh it." if running else "")
    nav = " · ".join(f'<a href="#{key}">{html.escape(title.split(":")[0])}</a>' for key, title, _ in sections)
    body = "\n".join(f'<section id="{key}">\n<h2>{html.escape(title)}</h2>\n{content}\n</section>'
                     for key, title, content in sections)
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in sweep.notes)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="lesion-sweep sweep.report">
<title>Sweep {html.escape(name)}</title>
<style>{STYLE}{_STYLE}</style>
<script>{_ERROR_SCRIPT}</script>
<script>{get_plotlyjs()}</script>
</head>
<body>
<main>
<div id="page-errors" class="errors" hidden></div>
<h1>Sweep <code>{html.escape(name)}</code></h1>
<p class="muted">{html.escape(str(sweep.folder))} · page made {_clock(now)} by <code>python -m sweep.report</code>.
{status}</p>
{notes}
<nav>{nav}</nav>
{body}
</main>
<script>{_SORT_SCRIPT}</script>
<script>document.body.setAttribute("data-rendered-ms", String(Math.round(performance.now())));</script>
</body>
</html>
"""


def write_sweep_page(folder: str | Path) -> Path:
    """Read the sweep folder and write its report.html atomically; returns the page's path."""
    sweep = read_sweep(folder)
    path = sweep.folder / REPORT_FILE
    atomic.write_text(path, render(sweep))
    return path


def refresh_sweep_page(folder: str | Path) -> Path | None:
    """:func:`write_sweep_page` at the end of a sweep (and of --resume): a failure is a warning, never an error."""
    try:
        path = write_sweep_page(folder)
    except Exception as exc:  # noqa: BLE001 - the page is a view; the sweep's results are already written
        log.warning("%s not written: %s: %s (python -m sweep.report %s tries again)", REPORT_FILE,
                    type(exc).__name__, exc, folder)
        return None
    log.info("sweep page: %s", path)
    return path


# --- sections ----------------------------------------------------------------------------------------------
def _facts_section(sweep: SweepFolder, now: float) -> str:
    s = sweep.settings
    rows: list[tuple[str, str]] = []
    data = s.get("data") or "the built-in synthetic demo dataset"
    best_data = (sweep.best or {}).get("data") or {}
    extra = ", ".join(x for x in (f"{best_data['layout']} layout" if best_data.get("layout") else "",
                                  f"fingerprint {best_data['fingerprint'][:12]}" if best_data.get("fingerprint")
                                  else "") if x)
    rows.append(("data", f"<code>{html.escape(str(data))}</code>" + (f" ({html.escape(extra)})" if extra else "")))
    rows.append(("split", _split_text(sweep.folder / filenames.SPLITS)))
    if sweep.space is not None:
        params = "".join(f"<li><code>{html.escape(p.name)}</code>: {html.escape(p.describe())}</li>"
                         for p in sweep.space.params)
        rows.append(("space", f"<code>{html.escape(str(s.get('space')))}</code>: "
                              f"{html.escape(sweep.space.description)}<ul>{params}</ul>"))
    fixed = _fixed_config(sweep)
    if fixed:
        rows.append(("fixed for every trial", f"<code>{html.escape(fixed)}</code> (the space's base, --set and "
                                              "--max-epochs; every other key at its default)"))
    rows.append(("command", f"<code>{html.escape(_command(s))}</code>"))
    epochs = _max_epochs(sweep)
    scheduler = _scheduler_text(sweep, epochs)
    limit = f" (no new trial after {s['budget']} trial-epochs)" if s.get("budget") else ""
    rows.append(("budget", f"{s.get('trials')} trials of up to {epochs} epochs{limit}; {scheduler}; "
                           f"{'random search' if s.get('sampler') == 'random' else 'TPE'} seed {s.get('seed')}; metric <code>{html.escape(sweep.metric)}</code> "
                           f"({'maximised' if sweep.mode == 'max' else 'minimised'})"))
    rows.append(("resources", _resources_text(s, sweep.records)))
    rows += _time_rows(sweep, now)
    rows.append(("trials", _states_text(sweep)))
    if sweep.study is not None:
        counts = pd.Series([t.state.name for t in sweep.study.get_trials(deepcopy=False)]).value_counts()
        rows.append(("Optuna study", ", ".join(f"{n} {state}" for state, n in counts.items()) or "no trials yet"))
    failed = sweep.trials[sweep.trials["state"] == "failed"]
    body = "<table class=\"facts\">" + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    body += "</table>"
    if not failed.empty:
        shown = failed.head(20)
        body += (f"<h3>Failed trials ({len(failed)})</h3><ul>" + "".join(
            f"<li><code>{html.escape(str(r.trial_id))}</code>: {html.escape(_text(r.error) or 'no error recorded')}"
            "</li>" for r in shown.itertuples()) + "</ul>"
            + (f"<p class=\"muted\">{len(failed) - len(shown)} more in trials.csv</p>" if len(failed) > len(shown)
               else ""))
    return body


def _scheduler_text(sweep: SweepFolder, epochs: int) -> str:
    """ASHA's rungs as the sweep ran them (options, else the space's asha:, else the defaults)."""
    s = sweep.settings
    if s.get("scheduler") != "asha":
        return "no early stopping"
    if sweep.space is None or not epochs:
        return "ASHA early stopping"
    settings = SweepSettings(name="", results="", grace_period=s.get("grace_period"),
                             reduction_factor=s.get("reduction_factor"))
    return f"early stopping by {settings.asha(sweep.space, epochs).describe()}"


def _fixed_config(sweep: SweepFolder) -> str:
    base = sweep.doc.get("base_config") or {}
    keys = list(sweep.space.base if sweep.space is not None else ())
    keys += [o.partition("=")[0].strip() for o in sweep.settings.get("overrides") or ()] + ["epochs"]
    return ", ".join(f"{k}={base[k]}" for k in dict.fromkeys(keys) if k in base)


def _command(s: Mapping[str, Any]) -> str:
    """The sweep's settings as the command that starts it (options left at their defaults are left out)."""
    defaults = SweepSettings(name="", results="")
    parts = ["python -m sweep.run"]
    for key, value in s.items():
        if key in ("name", "results", "overrides") or value is None or value == getattr(defaults, key, None):
            continue
        parts.append(f"{flag(key)} {value:g}" if isinstance(value, float) else f"{flag(key)} {value}")
    parts += [f"--set {o}" for o in s.get("overrides") or ()]
    return " ".join(parts + [f"--name {s.get('name')}"])


def _split_text(path: Path) -> str:
    try:
        splits = pd.read_csv(path, usecols=["label", "split"])
    except (OSError, ValueError):
        return '<span class="muted">splits.csv not written yet</span>'
    counts = splits["split"].value_counts()
    text = " / ".join(f"{int(counts.get(k, 0))} {k}" for k in ("train", "val", "test"))
    classes = splits["label"].nunique()
    return f"{text} images, {classes} classes, grouped by lesion (<code>splits.csv</code>; test is never used by the sweep)"


def _max_epochs(sweep: SweepFolder) -> int | None:
    base = sweep.doc.get("base_config") or {}
    return sweep.settings.get("max_epochs") or base.get("epochs")


def _resources_text(s: Mapping[str, Any], records: Mapping[str, Mapping[str, Any]]) -> str:
    nodes = [r.get("node") or {} for r in records.values() if r.get("node")]
    hosts = {n.get("hostname") for n in nodes} - {None}
    where = f"on {len(hosts)} nodes" if len(hosts) > 1 else "on one machine"
    cpus = s.get("cpus_per_trial") or (nodes[0].get("cpus") if nodes else None)
    cpu_text = f"{cpus} CPU(s) per trial" if cpus else "the CPUs shared among the trials that run at once"
    if s.get("gpus") == 0:
        return f"CPU only: {cpu_text}, {where}"
    gpus = "all visible" if s.get("gpus") is None else s.get("gpus")
    return f"{gpus} GPU(s), {s.get('gpus_per_trial') or 1:g} GPU and {cpu_text}, {where}"


def _time_rows(sweep: SweepFolder, now: float) -> list[tuple[str, str]]:
    records = list(sweep.records.values())
    starts = [r["started"] for r in records if r.get("started")]
    if not starts:
        return [("time", "no trial has started yet")]
    ends = [r.get("ended") or now for r in records]
    trial_s = [(r.get("ended") or now) - r["started"] if r.get("status") == "running" or r.get("duration_s") is None
               else float(r["duration_s"]) for r in records if r.get("started")]
    gpu_s = [t * float((r.get("node") or {}).get("gpus") or 0.0) for t, r in zip(trial_s, records)]
    created = min(_timestamp(sweep.doc.get("created")) or min(starts), min(starts))
    epochs_run = int(pd.to_numeric(sweep.trials["epochs_run"], errors="coerce").fillna(0).sum())
    if sweep.settings.get("budget"):
        budget = f" (--budget {sweep.settings['budget']}: no new trial after it; running trials finish)"
    else:
        most = (sweep.settings.get("trials") or 0) * (_max_epochs(sweep) or 0)
        budget = f" of the {most} the budget allows" if most else ""
    running = any(r.get("status") == "running" for r in records)
    rows = [("wall time", f"{_duration(max(ends) - created)}: {_clock(created)} (sweep started) to "
                          + ("now (trials running)" if running else f"{_clock(max(ends))} (last trial ended)")),
            ("compute", f"{sum(trial_s) / 3600:.2f} trial-hours, {sum(gpu_s) / 3600:.2f} GPU-hours; "
                        f"{epochs_run} trial-epochs run{budget}")]
    return rows


def _states_text(sweep: SweepFolder) -> str:
    table = sweep.trials
    search = table[table["role"] != "confirm"]
    counts = search["state"].value_counts()
    parts = [f"{int(counts.get(state, 0))} {state}" for state in STATES if counts.get(state, 0) or state != "running"]
    parts += [f"{int(n)} {state}" for state, n in counts.items() if state not in STATES]
    confirm = table[table["role"] == "confirm"]
    text = f"{len(search)} of {sweep.settings.get('trials')} search trials recorded: " + ", ".join(parts)
    text += f"; {len(confirm)} confirmation run(s)" + (
        f" ({', '.join(f'{n} {s}' for s, n in confirm['state'].value_counts().items())})" if len(confirm) else "")
    return text


def _best_section(sweep: SweepFolder) -> str:
    best = sweep.best
    if best is None:
        return ('<p class="muted">No best.json yet: it is written when the sweep ends (and only if a trial '
                "reported the metric).</p>")
    metric = best.get("metric") or {}
    confirmed = best.get("confirmation") if isinstance(best.get("confirmation"), dict) else None
    rows = [("trial", _trial_link(str(best.get("trial_id")))),
            (f"{metric.get('name')}", f"{_num(metric.get('value'))} " + (
                f"(mean of {len(confirmed['values'])} runs' last epochs: the search trial and its confirmation runs)"
                if confirmed and confirmed.get("values") else "(final epoch)"))]
    rows += [(f"<code>{html.escape(k)}</code>", html.escape(_fmt(v))) for k, v in (best.get("params") or {}).items()]
    final = sweep.folder / FINAL_DIR / REPORT_FILE
    out = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"
    known = {"format", "version", "config", "metric", "trial_id", "data", "splits_file", "checkpoint",
             "code_version", "created", "params", "sweep"}
    for key, value in best.items():  # e.g. the confirmation runs' values, mean and sd
        if key not in known and value not in (None, {}, []):
            out += f"<h3>{html.escape(key.replace('_', ' '))}</h3>{_json_html(value)}"
    link = (final_link() if final.is_file() else
            f"<p>Next: <code>python -m core.final_train {html.escape(str(sweep.folder / BEST_TRIAL))}</code></p>")
    return out + slot("link", FINAL_DIR, link)


def _trials_section(sweep: SweepFolder) -> str:
    table = sweep.trials
    if table.empty:
        return '<p class="muted">No trial has started yet.</p>'
    metric = sweep.metric
    final, best = f"{metric}_final", f"{metric}_best"
    shown = table.head(TOP_ROWS)
    params = [p for p in sweep.param_names if p in table]
    columns = [("rank", None), ("trial", None), ("TensorBoard", None), ("state", None), ("role", None),
               ("final", final), ("best", best), ("best epoch", "best_epoch"), ("epochs", "epochs_run"),
               ("minutes", "duration_s"), *[(p, p) for p in params], ("error", "error")]
    if (table["role"] == "search").all():
        columns.remove(("role", None))
    if shown["error"].isna().all():
        columns.remove(("error", "error"))
    head = "".join(f'<th title="click to sort">{html.escape(c)}</th>' for c, _ in columns)
    rows = []
    for rank, row in enumerate(shown.to_dict("records"), start=1):
        trial = str(row["trial_id"])
        cells = []
        for label, key in columns:
            if label == "rank":
                cells.append(_cell(rank))
            elif label == "trial":
                cells.append(f'<td data-v="{html.escape(trial)}">{_trial_link(trial)}</td>')
            elif label == "TensorBoard":
                url = f"{TENSORBOARD_URL}?runFilter={re.escape('trials/' + trial)}#timeseries"
                cells.append(f'<td><a href="{html.escape(url)}" title="needs tensorboard --logdir '
                             f'{html.escape(str(sweep.folder))} running">run</a></td>')
            elif label == "state":
                cells.append(f'<td class="state state-{row["state"].replace(" ", "-")}">{html.escape(row["state"])}</td>')
            elif label == "role":
                cells.append(f"<td>{html.escape(row['role'])}</td>")
            elif key == "duration_s":
                cells.append(_cell(finite_or_none(row.get(key)) / 60 if finite_or_none(row.get(key)) is not None else None, 1))
            elif key == "error":
                text = _text(row.get("error"))
                cells.append(f'<td class="error" title="{html.escape(text)}">{html.escape(text[:80])}</td>')
            else:
                cells.append(_cell(row.get(key)))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = (f"<p class=\"muted\">The best {TOP_ROWS} of {len(table)} trials; all of them are in "
            f"<a href=\"trials.csv\">trials.csv</a>.</p>" if len(table) > TOP_ROWS else "")
    return (f"<p><i>final</i>, <i>best</i>: <code>{html.escape(metric)}</code> at the trial's last epoch and at "
            "its best one. Best first by <i>final</i> (what best.json ranks by); click a column to sort. The trial "
            "links open its folder; the TensorBoard links need <code>tensorboard --logdir "
            f"{html.escape(str(sweep.folder))}</code> running.</p>{note}"
            f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>'
            + "\n".join(rows) + "</tbody></table></div>")


def _final_section(sweep: SweepFolder) -> str:
    """The final model's report, in the slot core.final_train fills when it ends (core/evaluation/report.py)."""
    return slot("section", FINAL_DIR, final_section(sweep.folder / FINAL_DIR) or _no_final_report(sweep))


def _no_final_report(sweep: SweepFolder) -> str:
    final = sweep.folder / FINAL_DIR
    command = f"python -m core.final_train {sweep.folder / BEST_TRIAL}"
    if (final / filenames.REPORT).is_file():
        return '<p>The final model\'s report: <a href="final/report.md">final/report.md</a>.</p>'
    if final.is_dir():
        return (f"<p>A final training is in <code>final/</code> but has not finished; its report appears here when "
                f"it does (<code>{html.escape(command)}</code> resumes it).</p>")
    return (f'<p class="muted">No final model yet. <code>{html.escape(command)}</code> retrains the best trial, '
            "evaluates it on the test split and adds its report here.</p>")


class Figures:
    """Each method returns the HTML of one figure, or a note saying why there is none (never an empty plot)."""

    def __init__(self, sweep: SweepFolder) -> None:
        self.sweep = sweep
        self.importance: dict[str, float] | None = None
        self.complete = []
        if sweep.study is not None:
            import optuna

            self.complete = sweep.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))

    def history(self) -> str:
        if not self.complete:
            return _note("No complete trial in optuna.db yet.")
        from optuna.visualization import plot_optimization_history

        fig = plot_optimization_history(self.sweep.study, target_name=self.sweep.metric)
        fig.update_layout(title=None, xaxis_title="Optuna trial number (in order of start)")
        return (_explain("Each complete trial's value, and the best so far. Optuna plots complete trials only; "
                         "trials stopped early appear here only if the sweep stored them as complete.")
                + _plot(fig, "history"))

    def importances(self) -> str:
        if len(self.complete) < 2:
            return _note("Needs at least two complete trials.")
        from optuna.visualization import plot_param_importances

        with warnings.catch_warnings(record=True) as caught:  # e.g. too few trials in a regime: said on the page
            warnings.simplefilter("always")
            try:
                fig = plot_param_importances(self.sweep.study, target_name=self.sweep.metric)
            except (RuntimeError, ValueError) as exc:
                return _note(f"Not computed: {exc}")
        said = " ".join(dict.fromkeys(f"Optuna: {w.message}" for w in caught))
        trace = fig.data[0] if fig.data else None
        if trace is None or not len(trace.x):
            return _note("Not computed: no parameter varied across the complete trials.")
        self.importance = dict(sorted(zip(trace.y, trace.x), key=lambda kv: -kv[1]))
        fig.update_layout(title=None, height=140 + 40 * len(trace.x))
        return (_explain("Optuna's importance evaluator (PED-ANOVA) on the complete trials: how much of the "
                         "metric's spread each parameter explains. " + said) + _plot(fig, "importances"))

    def _top_params(self, n: int) -> list[str] | None:
        present = {k for t in self.complete for k in t.params}
        order = [p for p in (self.importance or {}) if p in present]
        order += sorted(present - set(order))
        return order[:n] if order else None

    def parallel(self) -> str:
        params = self._top_params(PARALLEL_PARAMS)
        if not params:
            return _note("No complete trial in optuna.db yet.")
        from optuna.visualization import plot_parallel_coordinate

        fig = plot_parallel_coordinate(self.sweep.study, params=params, target_name=self.sweep.metric)
        if not fig.data:
            return _note("No complete trial with parameters yet.")
        fig.update_layout(title=None, height=460)
        return _explain("One line per complete trial, coloured by the metric. A conditional parameter a "
                        "trial did not sample sits at 'None'.") + _plot(fig, "parallel")

    def slices(self) -> str:
        params = self._top_params(SLICE_PARAMS)
        if not params:
            return _note("No complete trial in optuna.db yet.")
        from optuna.visualization import plot_slice

        fig = plot_slice(self.sweep.study, params=params, target_name=self.sweep.metric)
        if not fig.data:
            return _note("No complete trial with these parameters yet.")
        fig.update_layout(title=None, height=400)
        what = "most important" if self.importance else "first"
        return _explain(f"The metric against each of the {len(params)} {what} parameters; colour: trial number.") \
            + _plot(fig, "slices")

    def curves(self) -> str:
        import plotly.graph_objects as go

        sweep = self.sweep
        metric, table = sweep.metric, sweep.trials
        histories = {}
        for trial_id, epochs_run, state in zip(table["trial_id"].astype(str), table["epochs_run"], table["state"]):
            path = sweep.folder / filenames.TRIALS_DIR / trial_id / filenames.METRICS_CSV
            try:
                frame = pd.read_csv(path, usecols=["epoch", metric])
            except (OSError, ValueError):  # not written yet (a trial in its first epoch), or being replaced
                continue
            frame = frame.dropna()
            if state != "running" and finite_or_none(epochs_run) is not None:
                # A trial that the scheduler stopped may have finished an epoch Tune never received.
                frame = frame[frame["epoch"] <= float(epochs_run)]
            if not frame.empty:
                histories[trial_id] = frame
        if not histories:
            return _note("No trial has finished an epoch yet.")
        groups: dict[str, list[str]] = {}
        for row in table.itertuples():
            if str(row.trial_id) in histories:
                group = "confirmation" if row.role == "confirm" else row.state
                groups.setdefault(group, []).append(str(row.trial_id))
        top = [t for t in table[table["role"] != "confirm"]["trial_id"].astype(str).head(TOP_CURVES) if t in histories]
        traces = []
        for group, ids in groups.items():
            x, y, text = _joined([histories[t] for t in ids], metric, ids)
            traces.append(go.Scatter(x=x, y=y, text=text, mode="lines", name=f"{group} ({len(ids)})",
                                     line={"color": _COLOURS.get(group, "#9467bd"), "width": 1,
                                           "dash": "dot" if group == "running" else "solid"}, opacity=0.55,
                                     hovertemplate="trial %{text}<br>epoch %{x}: %{y:.4f}<extra>" + group
                                     + "</extra>", connectgaps=False))
        for rank, trial_id in enumerate(top, start=1):
            h = histories[trial_id]
            traces.append(go.Scatter(x=h["epoch"].tolist(), y=_rounded(h[metric]), mode="lines+markers",
                                     name=f"#{rank} {trial_id}", marker={"size": 5},
                                     line={"width": 2.5, "color": _TOP_COLOURS[(rank - 1) % len(_TOP_COLOURS)]},
                                     hovertemplate=f"trial {trial_id}<br>epoch %{{x}}: %{{y:.4f}}<extra>#{rank}</extra>"))
        for group, symbol in (("stopped early", "x"), ("failed", "x-thin-open")):
            ids = groups.get(group, [])
            if ids:
                traces.append(go.Scatter(
                    x=[float(histories[t]["epoch"].iloc[-1]) for t in ids],
                    y=_rounded(pd.Series([histories[t][metric].iloc[-1] for t in ids])), text=ids, mode="markers",
                    name=f"{group}: last epoch", opacity=0.7,
                    marker={"symbol": symbol, "size": 8, "color": _COLOURS[group],
                            "line": {"width": 1.5, "color": _COLOURS[group]}},
                    hovertemplate=f"trial %{{text}} {group} after epoch %{{x}}<extra></extra>"))
        fig = go.Figure(traces)
        fig.update_layout(height=480, xaxis_title="epoch", yaxis_title=metric, hovermode="closest")
        max_epochs = _max_epochs(sweep)
        if max_epochs:
            fig.update_xaxes(range=[0.8, max_epochs + 0.2], dtick=max(1, round(max_epochs / 10)))
        return (_explain(f"Every trial's {metric} per epoch (each trial's metrics.csv), by state; the {len(top)} "
                         "best trials drawn on their own; a cross marks where a trial was stopped early (or failed). "
                         "Click a legend entry to hide it.") + _plot(fig, "curves"))


def _joined(frames: Sequence[pd.DataFrame], metric: str, ids: Sequence[str]) -> tuple[list, list, list]:
    """Several trials' curves as one line trace: a None between trials breaks the line."""
    x: list = []
    y: list = []
    text: list = []
    for frame, trial_id in zip(frames, ids):
        x += frame["epoch"].tolist() + [None]
        y += _rounded(frame[metric]) + [None]
        text += [trial_id] * len(frame) + [None]
    return x, y, text


def _rounded(values: pd.Series) -> list[float]:
    return [round(float(v), 5) for v in values]  # 5 digits: the page's size, not the curve, changes


def _plot(fig: go.Figure, key: str) -> str:
    import plotly.io as pio

    fig.update_layout(template="plotly_white", autosize=True, margin={"t": 40, "b": 50})  # no title: the h2 says it
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, config=PLOT_CONFIG, div_id=f"fig-{key}",
                       default_height=f"{fig.layout.height or 450}px")


def _note(text: str) -> str:
    return f'<p class="muted no-figure">{html.escape(text)}</p>'


def _explain(text: str) -> str:
    return f'<p class="explain">{html.escape(text)}</p>'


# --- small formatting helpers --------------------------------------------------------------------------------
def _trial_link(trial_id: str) -> str:
    return f'<a href="trials/{html.escape(trial_id)}/">{html.escape(trial_id)}</a>'


def _cell(value: object, digits: int = 4) -> str:
    number = finite_or_none(value)
    if number is not None:
        shown = f"{number:.{digits}f}" if not float(number).is_integer() or digits == 1 else f"{int(number)}"
        if abs(number) < 1e-3 and number != 0:
            shown = f"{number:.3g}"
        return f'<td class="num" data-v="{number!r}">{shown}</td>'
    text = _text(value)
    return f'<td data-v="{html.escape(text)}">{html.escape(text) if text else "-"}</td>'


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _num(value: object) -> str:
    number = finite_or_none(value)
    return "n/a" if number is None else f"{number:.4f}"


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _json_html(value: object) -> str:
    """best.json's extra entries (e.g. confirmation statistics) as nested tables, whatever their shape."""
    if isinstance(value, Mapping):
        return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_json_html(v)}</td></tr>"
                                   for k, v in value.items()) + "</table>"
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        keys = list(dict.fromkeys(k for v in value for k in v))
        return ("<table><tr>" + "".join(f"<th>{html.escape(str(k))}</th>" for k in keys) + "</tr>" + "".join(
            "<tr>" + "".join(f"<td>{_json_html(v.get(k))}</td>" for k in keys) + "</tr>" for v in value)
            + "</table>")
    if isinstance(value, list):
        return html.escape(", ".join(_fmt(v) for v in value))
    return html.escape("-" if value is None else _fmt(value))


def _timestamp(text: object) -> float | None:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except (TypeError, ValueError):
        return None


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _duration(seconds: float) -> str:
    return duration_text(max(0.0, seconds))


_STYLE = """
main { max-width: 1400px; } nav { margin: 0.4em 0 1em; } nav a { margin: 0 2px; }
table.facts th { width: 11em; } table.facts ul { margin: 2px 0; padding-left: 1.2em; }
.explain { color: #59636e; margin: 0.2em 0 0.4em; } .note { color: #9a6700; }
.errors { background: #ffebe9; border: 1px solid #d1242f; padding: 8px 12px; color: #82071e; }
.scroll { overflow-x: auto; } table.sortable th { cursor: pointer; white-space: nowrap; }
table.sortable th.asc::after { content: " \\25B2"; } table.sortable th.desc::after { content: " \\25BC"; }
td.error { max-width: 28em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; color: #82071e; }
td.state { white-space: nowrap; } td.state-failed { color: #d1242f; } td.state-running { color: #bc4c00; } td.state-stopped-early { color: #59636e; }
section { margin-bottom: 1.5em; }
#final article.report h1 { font-size: 1.3em; } #final article.report h2 { font-size: 1.15em; border: none; }
"""
# Runs first: a script error (plotly failing to draw a figure, say) is shown at the top of the page, and
# recorded in #page-errors, which the browser test reads (tests/test_sweep_report_browser.py).
_ERROR_SCRIPT = """
(function () {
  var errors = [];
  function show() {
    var box = document.getElementById("page-errors");
    if (!box || !errors.length) return;
    box.hidden = false;
    box.textContent = "Script errors on this page (a figure may be missing): " + errors.join(" | ");
  }
  function record(message) { errors.push(String(message)); show(); }
  window.addEventListener("error", function (e) { record(e.message || e); });
  window.addEventListener("unhandledrejection", function (e) {
    record((e.reason && e.reason.message) || e.reason);
  });
  var consoleError = console.error;
  console.error = function () {
    record(Array.prototype.join.call(arguments, " "));
    consoleError.apply(console, arguments);
  };
  document.addEventListener("DOMContentLoaded", show);
})();
"""
# Click a column header of the trials table to sort by it (numbers as numbers; again to reverse).
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = !th.classList.contains("asc");
      table.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(asc ? "asc" : "desc");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col], v = cell.getAttribute("data-v");
        v = v === null ? cell.textContent : v;
        var n = parseFloat(v);
        return v !== "" && !isNaN(n) && isFinite(v) ? n : v;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === y) return 0;
        if (x === "" || x === "-") return 1;
        if (y === "" || y === "-") return -1;
        var c = typeof x === typeof y ? (x < y ? -1 : 1) : (typeof x === "number" ? -1 : 1);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


# --- command line ----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweep.report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a sweep's report.html: one self-contained page (opens offline) with the sweep's facts, "
                    "Optuna's figures, every trial's learning curve, the top trials and the final model.",
        epilog="python -m sweep.run writes the page at the end of a sweep (and of --resume), core.final_train "
               "adds the final model's section; run this to see a sweep that is still running.")
    parser.add_argument("sweep", metavar="SWEEP_DIR", help="a sweep's folder (results/<name>)")
    args = parser.parse_args(argv)
    path = write_sweep_page(args.sweep)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
