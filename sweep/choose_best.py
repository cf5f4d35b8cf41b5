"""``results/<sweep>/best.json``: what ``python -m core.final_train`` needs to retrain the chosen config.

Not a command. The schema (version 1, plain JSON, documented in search_spaces/README.md and in
core/best_file.py, which reads it for the final training) is::

    {"format": "lesion-sweep/best", "version": 1,
     "config": {...},                         # the chosen trial's complete TrainConfig.to_dict()
     "metric": {"name": ..., "value": ..., "mode": "max" | "min"},   # the value it was ranked by
     "trial_id": ...,                         # the search trial of the chosen config
     "data": {"path": ..., "fingerprint": ..., "layout": ...},
     "splits_file": "splits.csv",             # relative to best.json
     "checkpoint": "trials/<id>/best.pt",     # relative to best.json; null if not kept
     "trial_epochs": {"budget": ..., "runs": {"<trial id>": epochs run, ...}},   # optional
     "confirmation": {...} | null,            # optional: the chosen config's runs, mean and sd
     "code_version": {"package": ..., "git_commit": ..., "git_dirty": ...},
     "created": ISO 8601 time,
     "params": {...}, "sweep": {...}}         # extra: the sampled values and how the sweep ran

The chosen config is the search's best trial that ran every epoch (a trial stopped early only when none
did), or, after a confirmation stage, the confirmed config with the best mean (sweep/confirm.py).
:func:`write_best` checks the file with core's reader before it is renamed into place, so the sweep
never leaves a best.json that the final training would refuse.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from core import atomic, filenames
from core.best_file import BEST_FORMAT, BEST_VERSION, read_best
from core.config import TrainConfig
from sweep.confirm import ConfirmedConfig, best_record
from sweep.outputs import read_trial

REPO_ROOT = Path(__file__).resolve().parents[1]


def choose_and_write(sweep_dir: Path, frame: pd.DataFrame, confirmed: Sequence[ConfirmedConfig], *,
                     metric: str, mode: str, base: TrainConfig, data: Mapping[str, str],
                     sweep: Mapping[str, Any]) -> dict[str, Any] | None:
    """Pick the config to hand on, write best.json, and return its contents (None: no trial has a value)."""
    final = f"{metric}_final"
    ranked = frame[(frame["role"] == "search") & frame[final].notna() & (frame["status"] != "failed")]
    if ranked.empty:
        return None
    trial_id = confirmed[0].trial_id if confirmed else ranked.iloc[0]["trial_id"]
    row = ranked[ranked["trial_id"] == trial_id].iloc[0]
    params = read_trial(sweep_dir, trial_id)["params"]
    config = TrainConfig.from_dict(params, base=base)  # as the trial built it (sweep/trainable.py)
    checkpoint = Path("trials") / trial_id / filenames.BEST_CHECKPOINT
    runs = confirmed[0].runs if confirmed else ({"trial_id": trial_id, "epochs_run": int(row["epochs_run"])},)
    best = build_best(
        config=config.to_dict(), metric=metric, value=confirmed[0].mean if confirmed else float(row[final]),
        mode=mode, trial_id=trial_id, data=data, splits_file=filenames.SPLITS,
        checkpoint=str(checkpoint) if (sweep_dir / checkpoint).is_file() else None, params=params,
        trial_epochs={"budget": base.epochs, "runs": {r["trial_id"]: r["epochs_run"] for r in runs}},
        confirmation=best_record(confirmed[0], confirmed) if confirmed else None,
        sweep={**sweep, "search_value": float(row[final]), "best_epoch_value": _maybe_float(row[f"{metric}_best"])})
    write_best(sweep_dir / filenames.BEST_TRIAL, best)
    return best


def build_best(*, config: Mapping[str, Any], metric: str, value: float, mode: str, trial_id: str,
               data: Mapping[str, str], splits_file: str, checkpoint: str | None, params: Mapping[str, Any],
               sweep: Mapping[str, Any], trial_epochs: Mapping[str, Any] | None = None,
               confirmation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"format": BEST_FORMAT, "version": BEST_VERSION, "config": dict(config),
            "metric": {"name": metric, "value": float(value), "mode": mode}, "trial_id": trial_id,
            "data": dict(data), "splits_file": splits_file, "checkpoint": checkpoint,
            "trial_epochs": dict(trial_epochs) if trial_epochs else None,
            "confirmation": dict(confirmation) if confirmation else None,
            "code_version": code_version(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "params": dict(params), "sweep": dict(sweep)}


def write_best(path: str | Path, best: Mapping[str, Any]) -> None:
    """Write best.json atomically, after core's reader (the final training's) has accepted it."""
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(best, indent=2) + "\n", encoding="utf-8")
        read_best(tmp)


def code_version() -> dict[str, Any]:
    """The package version and, where the code is a git checkout, its commit (and whether it was edited)."""
    from importlib import metadata

    try:
        package = metadata.version("lesion-sweep")
    except metadata.PackageNotFoundError:
        package = _pyproject_version()
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "core", "sweep"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": package, "git_commit": commit, "git_dirty": dirty}


def _pyproject_version() -> str | None:
    # A line search, not tomllib: that is Python 3.11+, and the project supports 3.10.
    try:
        text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    project = text.split("[project]", 1)[-1].split("\n[", 1)[0]
    match = re.search(r'^version\s*=\s*"([^"]+)"', project, flags=re.MULTILINE)
    return match.group(1) if match else None


def _maybe_float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
