"""``results/<sweep>/ensemble.json``: the ensemble a sweep chose on the validation split (sweep/ensemble.py writes
it, core.final_train builds the ensemble model from it). Read (:func:`read_ensemble_choice`) and written
(:func:`write_ensemble_choice`) here only, so its schema is stated once, here. Version 1, plain JSON::

    {"format": "lesion-sweep/ensemble-choice", "version": 1,
     "metric": {"name": str, "mode": "max" | "min"},      # the sweep's metric, on the validation split
     "max_size": int,                                     # --ensemble-size: the most picks (with replacement)
     "n_val_images": int,
     "candidates": [{"trial_id": str, "role": "search" | "confirm", "value": number}, ...],
                                                          # every full-length run, best value first
     "members": [{"trial_id": str, "role": str, "count": int, "weight": number,
                  "checkpoint": "trials/<id>/best.pt"}, ...],   # count / sum of counts = weight
     "steps": [{"added": trial_id, "value": number}, ...],       # the greedy picks in order, the first = best single
     "stopped": str,                                      # why the selection stopped
     "best_single": {"trial_id": str, "value": number},
     "ensemble_value": number,                            # val value of the weighted mean of the members' probabilities
     "created": ISO 8601 time}

Paths are relative to the file's folder. Every problem is a :class:`~core.errors.UserError` naming the file and
the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from core.io import atomic
from core import filenames
from core.errors import UserError
from core.io.state_files import read_json_object, reading

CHOICE_FORMAT = "lesion-sweep/ensemble-choice"
CHOICE_VERSION = 1
CHOICE_ADVICE = "run python -m sweep.run --resume on the sweep to write it again"


@dataclass(frozen=True)
class EnsembleMember:
    trial_id: str
    role: str
    count: int
    weight: float
    checkpoint: Path              # resolved


@dataclass(frozen=True)
class EnsembleChoice:
    """A validated ensemble.json."""

    path: Path
    metric_name: str
    metric_mode: str
    max_size: int
    members: tuple[EnsembleMember, ...]
    best_single_id: str
    best_single_value: float
    ensemble_value: float
    document: dict[str, Any]

    @property
    def is_ensemble(self) -> bool:
        """Two or more distinct members (one member: no addition improved on the best single run)."""
        return len(self.members) > 1


@dataclass(frozen=True)
class GreedyOutcome:
    """How the greedy selection went: each step's ``{"added": trial_id, "value"}`` (the first: the best single
    run), why it stopped, and the ensemble's validation score."""

    steps: Sequence[Mapping[str, Any]]
    stopped: str
    value: float


def choice_document(metric: str, mode: str, max_size: int, n_val: int, candidates: Sequence[Mapping[str, Any]],
                    members: Sequence[Mapping[str, Any]], outcome: GreedyOutcome) -> dict[str, Any]:
    """The ensemble.json document (schema above); ``candidates`` best first."""
    first = outcome.steps[0]
    return {"format": CHOICE_FORMAT, "version": CHOICE_VERSION, "metric": {"name": metric, "mode": mode},
            "max_size": int(max_size), "n_val_images": int(n_val), "candidates": [dict(c) for c in candidates],
            "members": [dict(m) for m in members], "steps": [dict(s) for s in outcome.steps],
            "stopped": outcome.stopped, "best_single": {"trial_id": first["added"], "value": float(first["value"])},
            "ensemble_value": float(outcome.value),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_ensemble_choice(path: str | os.PathLike, document: Mapping[str, Any]) -> None:
    """Write ensemble.json atomically, after checking it reads back."""
    path = Path(path)
    atomic.write_json(path, dict(document))
    read_ensemble_choice(path)


def read_ensemble_choice(path: str | os.PathLike) -> EnsembleChoice:
    path = Path(path)
    with reading(path, CHOICE_ADVICE, KeyError, TypeError, ValueError):
        doc = read_json_object(path, f"no {filenames.ENSEMBLE_CHOICE}")
        if doc.get("format") != CHOICE_FORMAT or doc.get("version") != CHOICE_VERSION:
            raise UserError(f"{path}: not an ensemble choice (format {CHOICE_FORMAT!r}, version {CHOICE_VERSION})")
        members = tuple(EnsembleMember(trial_id=str(m["trial_id"]), role=str(m["role"]), count=int(m["count"]),
                                       weight=float(m["weight"]), checkpoint=(path.parent / m["checkpoint"]).resolve())
                        for m in doc["members"])
        if not members or any(m.count < 1 for m in members):
            raise UserError(f"{path}: 'members' must list at least one member, each with a count of 1 or more")
        return EnsembleChoice(path=path, metric_name=str(doc["metric"]["name"]), metric_mode=str(doc["metric"]["mode"]),
                              max_size=int(doc["max_size"]), members=members,
                              best_single_id=str(doc["best_single"]["trial_id"]),
                              best_single_value=float(doc["best_single"]["value"]),
                              ensemble_value=float(doc["ensemble_value"]), document=doc)
