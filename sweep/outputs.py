"""What a sweep leaves in ``results/<sweep>/``: per-trial records, ``trials.csv`` and the printed summary.

Not a command (``python -m sweep.run`` writes these). Layout::

    results/<sweep>/
      sweep.json        settings of the sweep (read back by --resume); space.yaml: the space it searched
      best.json         the best trial, for python -m core.final_train (sweep/choose_best.py; schema: core/best_file.py)
      trials.csv        one row per trial: role (search / confirm), status, metric (final and best), epochs,
                        duration, parameters, seed, the search trial a confirmation run repeats, Optuna number
      confirm.json      the confirmation runs planned after the search (sweep/confirm.py)
      ensemble.json     the ensemble of full-length runs chosen on val (sweep/ensemble.py; schema: core/ensemble_file.py)
      summary.txt       the summary printed at the end
      report.html       the page to look at (sweep/report.py; python -m sweep.report results/<sweep> rewrites
                        it): facts, Optuna's figures, learning curves, top trials, the final model
      optuna.db         the Optuna study (optuna-dashboard sqlite:///results/<sweep>/optuna.db)
      splits.csv        the train/val/test assignment every trial used
      trials/<id>/      one core.train run per trial (config.json, metrics.csv, best.pt, val_probs.npz, TensorBoard
                        events) plus trial.json (parameters, status, error) and node.json (where it ran)
      ray/              Ray Tune's experiment state and trial checkpoints of the search (what --resume restores);
      ray-confirm/      the same for the confirmation stage
      final/            python -m core.final_train's output (report.md, report.html, model.pt, ...)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from core.io import atomic
from core import filenames
from sweep.settings import SweepSettings

TRIAL_FILE = filenames.TRIAL_RECORD
EXPERIMENTS = {"search": "ray", "confirm": "ray-confirm"}   # Ray Tune's folder of each stage (by trial role)
FINISHED = ("completed", "stopped early", "failed")
# trials.csv: search trials first, those that ran every epoch ahead of those stopped early (their values are
# of fewer epochs), then by the metric; confirmation runs after them.
_ROLE_ORDER = {"search": 0, "confirm": 1}
_STATUS_ORDER = {"completed": 0, "stopped early": 1, "running": 2, "failed": 3}


def trials_dir(sweep_dir: Path) -> Path:
    return sweep_dir / filenames.TRIALS_DIR


def read_trial(sweep_dir: Path, trial_id: str) -> dict[str, Any] | None:
    path = trials_dir(sweep_dir) / trial_id / TRIAL_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_trial(sweep_dir: Path, record: Mapping[str, Any]) -> None:
    atomic.write_json(trials_dir(sweep_dir) / record["trial_id"] / TRIAL_FILE, dict(record))


def read_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every trial's record, in the order the trials started."""
    records = [json.loads(p.read_text(encoding="utf-8")) for p in trials_dir(sweep_dir).glob(f"*/{TRIAL_FILE}")]
    return sorted(records, key=lambda r: (r.get("started") or 0, r["trial_id"]))


def epoch_history(run_dir: Path, up_to_epoch: float | None) -> list[dict[str, float]]:
    """core.train's per-epoch metrics (metrics.csv) up to the last epoch Tune received."""
    path = run_dir / filenames.METRICS_CSV
    if not path.is_file() or not up_to_epoch:
        return []
    frame = pd.read_csv(path)
    return frame[frame["epoch"] <= up_to_epoch].to_dict("records")


def best_of(history: Sequence[Mapping[str, float]], metric: str, mode: str) -> Mapping[str, float] | None:
    rows = [r for r in history if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not rows:
        return None
    return (max if mode == "max" else min)(rows, key=lambda r: r[metric])


def trials_frame(records: Iterable[Mapping[str, Any]], param_names: Sequence[str], metric: str,
                 mode: str) -> pd.DataFrame:
    """The trials table, best first (see _ROLE_ORDER / _STATUS_ORDER); failed trials last."""
    rows = []
    for rec in records:
        final, best = rec.get("final") or {}, rec.get("best") or {}
        node = rec.get("node") or {}
        row = {"trial_id": rec["trial_id"], "role": rec.get("role", "search"), "status": rec.get("status"),
               f"{metric}_final": final.get(metric), f"{metric}_best": best.get(metric),
               "best_epoch": best.get("epoch"), "epochs_run": rec.get("epochs_run"),
               "duration_s": rec.get("duration_s"), "seed": rec.get("seed"), "confirms": rec.get("confirms"),
               "optuna_trial": rec.get("optuna_trial"), "node_ip": node.get("node_ip"),
               "gpu_ids": " ".join(node.get("gpu_ids") or []) or None, "error": rec.get("error")}
        for name in param_names:
            row[name] = (rec.get("params") or {}).get(name)
        rows.append(row)
    columns = ["trial_id", "role", "status", f"{metric}_final", f"{metric}_best", "best_epoch", "epochs_run",
               "duration_s", *param_names, "seed", "confirms", "optuna_trial", "node_ip", "gpu_ids", "error"]
    frame = pd.DataFrame(rows, columns=columns).astype(
        {"best_epoch": "Int64", "epochs_run": "Int64", "seed": "Int64", "optuna_trial": "Int64"})
    if frame.empty:
        return frame
    order = pd.DataFrame({"role": frame["role"].map(_ROLE_ORDER).fillna(9),
                          "status": frame["status"].map(_STATUS_ORDER).fillna(9),
                          "value": pd.to_numeric(frame[f"{metric}_final"]) * (-1 if mode == "max" else 1)})
    ranked = order.sort_values(["role", "status", "value"], na_position="last", kind="stable").index
    return frame.loc[ranked].reset_index(drop=True)


def set_field(sweep_dir: Path, field: str, values: Mapping[str, Any]) -> None:
    """Set ``field`` in the records of the trials named in ``values`` (trial id -> value)."""
    for record in read_trials(sweep_dir):
        if record["trial_id"] in values and record.get(field) != values[record["trial_id"]]:
            write_trial(sweep_dir, {**record, field: values[record["trial_id"]]})


def write_trials_csv(sweep_dir: Path, param_names: Sequence[str], metric: str, mode: str) -> pd.DataFrame:
    frame = trials_frame(read_trials(sweep_dir), param_names, metric, mode)
    atomic.write_text(sweep_dir / filenames.TRIALS_CSV, frame.to_csv(index=False))
    return frame


def summary_text(settings: SweepSettings, sweep_dir: Path, frame: pd.DataFrame, best: Mapping[str, Any] | None,
                 param_names: Sequence[str], wall_s: float | None, sections: Sequence[Sequence[str]] = ()) -> str:
    """The end-of-sweep summary: best parameters and metric, top five, ``sections`` (ready-made lines: the
    confirmation, the Optuna study), outputs and the next command; ``sweep_dir`` as the user should see it."""
    name, metric, trials_wanted = settings.name, settings.metric, settings.trials
    search = frame[frame["role"] == "search"] if not frame.empty else frame
    counts = search["status"].value_counts().to_dict() if not search.empty else {}
    state = ", ".join(f"{counts.get(s, 0)} {s}" for s in FINISHED)
    confirm_runs = len(frame) - len(search)
    lines = [f"sweep '{name}': {len(search)} of {trials_wanted} trials ({state})"
             + (f" and {confirm_runs} confirmation run(s)" if confirm_runs else "")
             + (f" in {duration_text(wall_s)}" if wall_s is not None else "")]
    lines += _best_lines(best, metric, param_names)
    if not search.empty:
        shown = [c for c in ["trial_id", "status", f"{metric}_final", f"{metric}_best", "epochs_run", *param_names]
                 if c in search]
        top = search.head(5)[shown].astype(object)
        top = top.where(top.notna(), "-")  # a conditional parameter not sampled, a metric never reported
        top.insert(0, "rank", range(1, len(top) + 1))
        lines += ["", "top 5 (trials that ran every epoch first):",
                  top.to_string(index=False, formatters={c: _fmt for c in top.columns})]
    for section in sections:
        if section:
            lines += ["", *section]
    lines += ["", f"outputs in {sweep_dir}/: best.json, trials.csv, summary.txt, optuna.db, splits.csv, trials/",
              f"  {sweep_dir}/report.html: the sweep's page, to open in a browser",
              f"  tensorboard --logdir {sweep_dir}",
              f"  optuna-dashboard sqlite:///{sweep_dir / filenames.OPTUNA_DB}"]
    if best is not None:
        lines += ["next:", f"  python -m core.final_train {sweep_dir}/best.json"]
    return "\n".join(lines)


def _best_lines(best: Mapping[str, Any] | None, metric: str, param_names: Sequence[str]) -> list[str]:
    if best is None:
        return ["no trial reported the metric: there is no best trial (see the errors in trials.csv)"]
    confirmed = best.get("confirmation")
    if confirmed:
        sd = f" +- {confirmed['sd']:.4f}" if confirmed.get("sd") is not None else ""
        lines = [f"best config: trial {best['trial_id']}: {metric} = {confirmed['mean']:.4f}{sd} "
                 f"(mean of {len(confirmed['values'])} runs, last epoch)"]
    else:
        lines = [f"best trial {best['trial_id']}: {metric} = {best['metric']['value']:.4f} (final epoch)"]
    return lines + [f"  {key} = {_fmt(best['params'][key])}" for key in param_names if key in best["params"]]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def duration_text(seconds: float) -> str:
    """``1h02m03s`` or ``2m03s``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
