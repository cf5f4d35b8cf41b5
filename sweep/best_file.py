"""``results/<sweep>/best.json``: what ``python -m core.final_train`` needs to retrain the best trial.

Not a command. The schema (version 1, plain JSON, documented in search_spaces/README.md and in
core/best_file.py, which reads it for the final training) is::

    {"format": "lesion-sweep/best", "version": 1,
     "config": {...},                         # the best trial's complete TrainConfig.to_dict()
     "metric": {"name": ..., "value": ..., "mode": "max" | "min"},
     "trial_id": ...,
     "data": {"path": ..., "fingerprint": ..., "layout": ...},
     "splits_file": "splits.csv",             # relative to best.json
     "checkpoint": "trials/<id>/best.pt",     # relative to best.json; null if not kept
     "code_version": {"package": ..., "git_commit": ..., "git_dirty": ...},
     "created": ISO 8601 time,
     "params": {...}, "sweep": {...}}         # extra: the sampled values and how the sweep ran

:func:`write_best` checks the file with core's reader before it is renamed into place, so the sweep
never leaves a best.json that the final training would refuse.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from core import atomic
from core.best_file import BEST_FORMAT, BEST_VERSION
from core.best_file import read_best as _core_read_best

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def build_best(*, config: Mapping[str, Any], metric: str, value: float, mode: str, trial_id: str,
               data: Mapping[str, str], splits_file: str, checkpoint: str | None, params: Mapping[str, Any],
               sweep: Mapping[str, Any]) -> dict[str, Any]:
    return {"format": BEST_FORMAT, "version": BEST_VERSION, "config": dict(config),
            "metric": {"name": metric, "value": float(value), "mode": mode}, "trial_id": trial_id,
            "data": dict(data), "splits_file": splits_file, "checkpoint": checkpoint,
            "code_version": code_version(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "params": dict(params), "sweep": dict(sweep)}


def write_best(path: str | Path, best: Mapping[str, Any]) -> None:
    """Write best.json atomically, after core's reader (the final training's) has accepted it."""
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(best, indent=2) + "\n", encoding="utf-8")
        _core_read_best(tmp)


def read_best(path: str | Path) -> dict[str, Any]:
    """The contents of a best.json (or of a sweep folder's), validated as the final training reads it."""
    return atomic.read_json_object(_core_read_best(path).path, "no such file")


def _pyproject_version() -> str | None:
    import tomllib

    try:
        return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
