"""``results/<sweep>/best.json``: the sweep's chosen configuration, data and split, what ``python -m
core.final_train`` retrains. Read (:func:`read_best`, with plain ``json``: core knows nothing of Ray or Optuna) and
written (:func:`write_best`, by the sweep: sweep/choose_best.py) here, so its schema is stated once, here.
Version 1, plain JSON::

    {"format": "lesion-sweep/best", "version": 1,
     "config": {...},                         # the chosen trial's complete TrainConfig.to_dict()
     "metric": {"name": str, "value": number, "mode": "max" | "min"},   # the value it was ranked by
     "trial_id": str,                         # the search trial of the chosen config
     "data": {"path": str, "fingerprint": str, "layout": str},
     "splits_file": "splits.csv",             # relative to best.json's folder (or absolute)
     "checkpoint": "trials/<id>/best.pt" | null,   # optional; relative paths as for splits_file
     "trial_epochs": {"budget": int, "runs": {trial id: epochs run}} | null,   # optional (older files lack it)
     "confirmation": {"values": [...], "mean": number, "sd": number, "search_rank": int,
                      "runs": [{"trial_id", "role", "seed", "value", "epochs_run", "folder"}, ...],
                      "configs": [{"trial_id", "search_rank", "mean", "sd", "values"}, ...],
                      "ranked_by": str} | null,    # optional: the confirmation stage (sweep/confirm.py)
     "code_version": {"package": str, "git_commit": str | null, "git_dirty": bool | null},
     "created": ISO 8601 time,
     "params": {...}, "sweep": {...}}         # extra: the sampled values and how the sweep ran

``trial_epochs.budget`` is the trial length the config was tuned at (:attr:`BestFile.trial_epochs`; None for
older files); core.final_train retrains for the config's own ``epochs`` unless told otherwise. Every problem
is a :class:`~core.errors.UserError` naming the file and the field; :func:`write_best` checks a file with
:func:`read_best` before renaming it into place, so a sweep never leaves one the final training would refuse.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from core import filenames
from core.io.atomic import atomic_path
from core.config import TrainConfig
from core.data.dataset import dataset_fingerprint
from core.errors import UserError
from core.io.state_files import read_json_object, reading

REPO_ROOT = Path(__file__).resolve().parents[1]
BEST_FORMAT = "lesion-sweep/best"
BEST_VERSION = 1
# What to do about a damaged splits.csv of a sweep: every trial's run folder holds the same split.
SPLITS_ADVICE = "every trial's folder holds a copy (trials/<id>/splits.csv): copy one back"


@dataclass(frozen=True)
class BestFile:
    """A validated ``best.json``; paths are resolved."""

    path: Path
    config: TrainConfig
    metric_name: str
    metric_value: float
    metric_mode: str
    trial_id: str
    data_path: Path
    data_fingerprint: str
    data_layout: str
    splits_file: Path
    checkpoint: Path | None
    code_version: dict[str, Any]
    created: str
    trial_epochs: int | None = None   # the epochs the sweep's trials ran up to (None: not recorded)

    @property
    def folder(self) -> Path:
        return self.path.parent


def read_best(path: str | os.PathLike) -> BestFile:
    """Parse and validate ``best.json``; the data and split files must exist (see :func:`check_data`)."""
    path = Path(path)
    if path.is_dir():
        path = path / filenames.BEST_TRIAL
    folder = path.resolve().parent
    if not path.exists():
        raise UserError(f"{path}: no such file (a sweep writes results/<name>/best.json)")
    with reading(path, f"the sweep writes it again: python -m sweep.run --resume --name {folder.name} "
                       f"--results {folder.parent}"):
        obj = read_json_object(path, "no such file")
    where = str(path)
    if obj.get("format") != BEST_FORMAT:
        raise UserError(f"{path}: field 'format' is {obj.get('format')!r}, expected {BEST_FORMAT!r} "
                        f"(not a sweep's best.json)")
    if obj.get("version") != BEST_VERSION:
        raise UserError(f"{path}: field 'version' is {obj.get('version')!r}; this code reads version {BEST_VERSION}")

    config = _config(obj, where)

    metric_name, metric_value, metric_mode = _metric(obj, where)

    trial_id = _field(obj, "trial_id", where)
    trial_id = str(_expect(trial_id, (str, int), where, "trial_id"))

    data = _expect(_field(obj, "data", where), dict, where, "data")
    data_path = _expect(_field(data, "path", where, "data."), str, where, "data.path")
    fingerprint = _expect(_field(data, "fingerprint", where, "data."), str, where, "data.fingerprint")
    layout = _expect(_field(data, "layout", where, "data."), str, where, "data.layout")

    splits = _expect(_field(obj, "splits_file", where), str, where, "splits_file")
    checkpoint = obj.get("checkpoint")
    if checkpoint is not None:
        _expect(checkpoint, str, where, "checkpoint")
    trial_epochs = _trial_epochs(obj.get("trial_epochs"), where)
    code_version = _expect(_field(obj, "code_version", where), dict, where, "code_version")
    created = _expect(_field(obj, "created", where), str, where, "created")
    try:
        datetime.fromisoformat(created)
    except ValueError:
        raise UserError(f"{path}: field 'created' is {created!r}, expected an ISO 8601 time") from None

    return BestFile(path=path, config=config, metric_name=metric_name, metric_value=metric_value,
                    metric_mode=metric_mode, trial_id=trial_id, data_path=Path(data_path).expanduser(),
                    data_fingerprint=fingerprint, data_layout=layout, splits_file=folder / splits,
                    checkpoint=folder / checkpoint if checkpoint else None, code_version=code_version,
                    created=created, trial_epochs=trial_epochs)


def _config(obj: Mapping[str, Any], where: str) -> TrainConfig:
    config_dict = _expect(_field(obj, "config", where), dict, where, "config")
    missing = [key for key in TrainConfig.keys() if key not in config_dict]
    if missing:
        # A default filled in here would silently change the configuration the sweep chose.
        raise UserError(f"{where}: field 'config' lacks key '{missing[0]}' ({len(missing)} missing); "
                        f"a best.json holds the complete configuration")
    try:
        return TrainConfig.from_dict(config_dict)
    except UserError as exc:
        raise UserError(f"{where}: field 'config': {exc}") from None


def _metric(obj: Mapping[str, Any], where: str) -> tuple[str, float, str]:
    """``metric``'s name, value and mode."""
    metric = _expect(_field(obj, "metric", where), dict, where, "metric")
    name = _expect(_field(metric, "name", where, "metric."), str, where, "metric.name")
    value = _expect(_field(metric, "value", where, "metric."), (int, float), where, "metric.value")
    if not math.isfinite(value):
        raise UserError(f"{where}: field 'metric.value' is {value!r}, expected a finite number")
    mode = _expect(_field(metric, "mode", where, "metric."), str, where, "metric.mode")
    if mode not in ("max", "min"):
        raise UserError(f"{where}: field 'metric.mode' is {mode!r}, expected 'max' or 'min'")
    return name, float(value), mode


def _trial_epochs(value: object, where: str) -> int | None:
    """The optional ``trial_epochs.budget``: the trial length the config was tuned at."""
    if value is None:
        return None
    budget = _expect(_field(_expect(value, dict, where, "trial_epochs"), "budget", where, "trial_epochs."), int,
                     where, "trial_epochs.budget")
    if budget < 1:
        raise UserError(f"{where}: field 'trial_epochs.budget' is {budget}, expected at least 1")
    return budget


def check_data(best: BestFile) -> None:
    """The dataset must still be there, unchanged (same fingerprint), and the split file readable."""
    if not best.data_path.exists():
        raise UserError(f"{best.path}: the dataset {best.data_path} (field 'data.path') is gone")
    if not best.splits_file.is_file():
        raise UserError(f"{best.path}: the split file {best.splits_file} (field 'splits_file') is missing")
    now = dataset_fingerprint(best.data_path)
    if now != best.data_fingerprint:
        raise UserError(f"{best.path}: the dataset {best.data_path} changed since the sweep (fingerprint "
                        f"{now[:12]} now, {best.data_fingerprint[:12]} then); rerun the sweep on it")


def _field(obj: Mapping[str, Any], key: str, where: str, prefix: str = "") -> Any:
    if key not in obj:
        raise UserError(f"{where}: field '{prefix}{key}' is missing")
    return obj[key]


def _expect(value: object, kind: type | tuple[type, ...], where: str, name: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        wanted = " or ".join({dict: "an object", str: "a string", int: "a number", float: "a number"}[k]
                             for k in kinds if k is not float or int not in kinds)
        raise UserError(f"{where}: field '{name}' is {type(value).__name__} {_brief(value)}, expected {wanted}")
    return value


def _brief(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, (set, bytes)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- writing (the sweep) -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BestChoice:
    """What a sweep hands on: every field of best.json but ``code_version`` and ``created`` (added when written)."""

    config: Mapping[str, Any]                  # TrainConfig.to_dict() of the chosen config
    metric: str
    value: float
    mode: str
    trial_id: str
    data: Mapping[str, str]                    # path, fingerprint, layout
    params: Mapping[str, Any]
    sweep: Mapping[str, Any]
    splits_file: str = filenames.SPLITS
    checkpoint: str | None = None
    trial_epochs: Mapping[str, Any] | None = None
    confirmation: Mapping[str, Any] | None = None

    def document(self) -> dict[str, Any]:
        """The best.json object (schema in the module docstring)."""
        return {"format": BEST_FORMAT, "version": BEST_VERSION, "config": dict(self.config),
                "metric": {"name": self.metric, "value": float(self.value), "mode": self.mode},
                "trial_id": self.trial_id, "data": dict(self.data), "splits_file": self.splits_file,
                "checkpoint": self.checkpoint, "trial_epochs": dict(self.trial_epochs) if self.trial_epochs else None,
                "confirmation": dict(self.confirmation) if self.confirmation else None,
                "code_version": code_version(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "params": dict(self.params), "sweep": dict(self.sweep)}


def write_best(path: str | Path, best: Mapping[str, Any]) -> None:
    """Write best.json atomically, after :func:`read_best` (the final training's reader) has accepted it."""
    path = Path(path)
    with atomic_path(path) as tmp:
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
