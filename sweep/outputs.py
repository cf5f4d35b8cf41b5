"""What a sweep leaves in ``results/<sweep>/``: per-trial records, ``trials.csv`` and the printed summary.

Not a command (``python -m sweep.run`` writes these). Layout::

    results/<sweep>/
      sweep.json        settings of the sweep (read back by --resume); space.yaml: the space it searched
      best.json         the best trial, for python -m core.final_train (sweep/best_file.py)
      trials.csv        one row per trial: status, metric (final and best), epochs, duration, parameters
      summary.txt       the summary printed at the end
      report.html       the page to look at (sweep/report.py; python -m sweep.report results/<sweep> rewrites
                        it): facts, Optuna's figures, learning curves, top trials, the final model
      optuna.db         the Optuna study (optuna-dashboard sqlite:///results/<sweep>/optuna.db)
      splits.csv        the train/val/test assignment every trial used
      trials/<id>/      one core.train run per trial (config.json, metrics.csv, best.pt, TensorBoard
                        events) plus trial.json (parameters, status, error) and node.json (where it ran)
      ray/              Ray Tune's experiment state and trial checkpoints (what --resume restores)
      final/            python -m core.final_train's output (report.md, report.html, model.pt, ...)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from core import atomic, filenames

TRIAL_FILE = "trial.json"
FINISHED = ("completed", "stopped early", "failed")


def trials_dir(sweep_dir: Path) -> Path:
    return sweep_dir / "trials"


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
    """The trials table, best first (by the final value of ``metric``); failed trials last."""
    rows = []
    for rec in records:
        final, best = rec.get("final") or {}, rec.get("best") or {}
        node = rec.get("node") or {}
        row = {"trial_id": rec["trial_id"], "status": rec.get("status"),
               f"{metric}_final": final.get(metric), f"{metric}_best": best.get(metric),
               "best_epoch": best.get("epoch"), "epochs_run": rec.get("epochs_run"),
               "duration_s": rec.get("duration_s"), "node_ip": node.get("node_ip"),
               "gpu_ids": " ".join(node.get("gpu_ids") or []) or None, "error": rec.get("error")}
        for name in param_names:
            row[name] = (rec.get("params") or {}).get(name)
        rows.append(row)
    columns = ["trial_id", "status", f"{metric}_final", f"{metric}_best", "best_epoch", "epochs_run",
               "duration_s", *param_names, "node_ip", "gpu_ids", "error"]
    frame = pd.DataFrame(rows, columns=columns).astype({"best_epoch": "Int64", "epochs_run": "Int64"})
    if not frame.empty:
        frame = frame.sort_values(f"{metric}_final", ascending=mode == "min", na_position="last", kind="stable")
    return frame.reset_index(drop=True)


def write_trials_csv(sweep_dir: Path, param_names: Sequence[str], metric: str, mode: str) -> pd.DataFrame:
    frame = trials_frame(read_trials(sweep_dir), param_names, metric, mode)
    atomic.write_text(sweep_dir / "trials.csv", frame.to_csv(index=False))
    return frame


def summary_text(*, name: str, sweep_dir: Path, frame: pd.DataFrame, best: Mapping[str, Any] | None,
                 metric: str, param_names: Sequence[str], importances: Mapping[str, float] | None,
                 wall_s: float | None, trials_wanted: int) -> str:
    """The end-of-sweep summary: best parameters and metric, top five, outputs and the next command."""
    counts = frame["status"].value_counts().to_dict() if not frame.empty else {}
    state = ", ".join(f"{counts.get(s, 0)} {s}" for s in FINISHED)
    lines = [f"sweep '{name}': {len(frame)} of {trials_wanted} trials ({state})"
             + (f" in {_duration(wall_s)}" if wall_s is not None else "")]
    if best is not None:
        lines.append(f"best trial {best['trial_id']}: {metric} = {best['metric']['value']:.4f} (final epoch)")
        for key in param_names:
            if key in best["params"]:
                lines.append(f"  {key} = {_fmt(best['params'][key])}")
    else:
        lines.append("no trial reported the metric: there is no best trial (see the errors in trials.csv)")
    if not frame.empty:
        shown = [c for c in ["trial_id", "status", f"{metric}_final", f"{metric}_best", "epochs_run", *param_names]
                 if c in frame]
        top = frame.head(5)[shown].astype(object)
        top = top.where(top.notna(), "-")  # a conditional parameter not sampled, a metric never reported
        top.insert(0, "rank", range(1, len(top) + 1))
        lines += ["", "top 5:", top.to_string(index=False, formatters={c: _fmt for c in top.columns})]
    if importances:
        lines += ["", "parameter importances (Optuna): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in importances.items())]
    lines += ["", f"outputs in {sweep_dir}/: best.json, trials.csv, summary.txt, optuna.db, splits.csv, trials/",
              f"  {sweep_dir}/report.html: the sweep's page, to open in a browser",
              f"  tensorboard --logdir {sweep_dir}",
              f"  optuna-dashboard sqlite:///{sweep_dir}/optuna.db"]
    if best is not None:
        lines += ["next:", f"  python -m core.final_train {sweep_dir}/best.json"]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
