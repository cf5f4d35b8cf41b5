"""The ensemble a sweep hands on besides its winner: greedy forward selection with replacement (Caruana et al.,
ICML 2004, what auto-sklearn and AutoGluon run after their search) over the sweep's full-length runs, on the
validation split and the sweep's metric; written as ``results/<sweep>/ensemble.json`` (schema:
core/ensemble_file.py).

Not a command; ``python -m sweep.run`` runs it after the confirmation stage (``--ensemble-size N``, default 5;
1 turns it off). The candidates are the runs that trained to full length (search trials ASHA did not stop, and
confirmation runs), each with its validation probabilities at its chosen epoch (``trials/<id>/val_probs.npz``,
written beside best.pt by core/training/run_writer.py). The selection starts from the best run alone and adds, one pick
at a time, the run (again, if it is already in: with replacement) whose addition to the average gives the best
validation value; it stops when no addition improves the value or after N picks. A member's weight is its
count over N picks. Ties go to the run ranked higher (better value alone, then the earlier run), so a selection
is reproducible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from core import filenames
from core.ensemble_file import GreedyOutcome, choice_document, write_ensemble_choice
from core.evaluation.metrics import classification_metrics

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

STOP_NO_GAIN = "no addition improved the validation value"
STOP_SIZE = "reached --ensemble-size picks"


@dataclass(frozen=True)
class Selection:
    """What :func:`greedy_select` chose: ``counts[i]`` picks of candidate ``i``."""

    counts: np.ndarray            # int [M]
    steps: tuple[tuple[int, float], ...]   # (candidate picked, validation value after the pick); first = best single
    stopped: str
    values: np.ndarray            # each candidate's value alone [M]

    @property
    def weights(self) -> np.ndarray:
        return self.counts / self.counts.sum()

    @property
    def value(self) -> float:
        return self.steps[-1][1]


def metric_value(labels: np.ndarray, probs: np.ndarray, metric: str) -> float:
    """The sweep's metric (``val_balanced_accuracy``, ..., ``val_loss``: the cross-entropy) of probabilities."""
    loss = None
    if metric.endswith("loss"):
        loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))
    return float(classification_metrics(labels, probs, "val_", loss)[metric])


def greedy_select(probs: Sequence[np.ndarray], labels: np.ndarray, metric: str, max_size: int) -> Selection:
    """Greedy forward selection with replacement over candidates' probabilities ``probs`` ([N, C] each, in
    ranking order: an earlier candidate wins a tie); see the module docstring."""
    stack = np.stack([np.asarray(p, np.float64) for p in probs])
    sign = -1.0 if metric.endswith("loss") else 1.0     # compare as "higher is better"
    alone = np.array([metric_value(labels, p, metric) for p in stack])
    first = int(np.argmax(np.where(np.isnan(alone), -np.inf, sign * alone)))  # argmax: the first of equals
    counts = np.zeros(len(stack), dtype=np.int64)
    counts[first] = 1
    total, current = stack[first].copy(), float(alone[first])
    steps = [(first, current)]
    stopped = STOP_SIZE
    while counts.sum() < max_size:
        n = counts.sum()
        tried = np.array([metric_value(labels, (total + p) / (n + 1), metric) for p in stack])
        best = int(np.argmax(np.where(np.isnan(tried), -np.inf, sign * tried)))
        if not sign * tried[best] > sign * current:
            stopped = STOP_NO_GAIN
            break
        counts[best] += 1
        total += stack[best]
        current = float(tried[best])
        steps.append((best, current))
    return Selection(counts=counts, steps=tuple(steps), stopped=stopped, values=alone)


def full_length_runs(frame: pd.DataFrame, epochs: int) -> list[dict[str, Any]]:
    """The trials table's runs that trained every epoch (search trials not stopped early, confirmation runs)."""
    rows = frame[(frame["status"] == "completed") & (frame["epochs_run"] == epochs)]
    return [{"trial_id": str(r.trial_id), "role": str(r.role)} for r in rows.itertuples()]


def read_val_probs(run_dir: Path) -> dict[str, np.ndarray] | None:
    """A run's val_probs.npz (core/filenames.py), or None (an older run, or a damaged file: with a warning)."""
    path = run_dir / filenames.VAL_PROBS
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in ("probs", "labels", "image_ids")}
    except (OSError, ValueError, KeyError) as exc:
        log.warning("%s: unreadable (%s); the run is left out of the ensemble", path, exc)
        return None


def choose_ensemble(sweep_dir: Path, frame: pd.DataFrame, metric: str, mode: str, epochs: int, max_size: int,
                    echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Choose the ensemble over the sweep's full-length runs and write ensemble.json; None (and no file) when
    the ensemble is off (``max_size`` 1) or fewer than two runs have validation probabilities."""
    path = sweep_dir / filenames.ENSEMBLE_CHOICE
    path.unlink(missing_ok=True)  # an earlier choice of this sweep (--resume chooses again)
    if max_size <= 1:
        return None
    runs, probs = [], []
    for run in full_length_runs(frame, epochs):
        found = read_val_probs(sweep_dir / filenames.TRIALS_DIR / run["trial_id"])
        if found is None:
            continue
        if probs and not np.array_equal(found["image_ids"], runs[0]["image_ids"]):
            log.warning("trial %s: its validation images differ from the other runs'; left out of the ensemble",
                        run["trial_id"])
            continue
        runs.append({**run, "image_ids": found["image_ids"], "labels": found["labels"]})
        probs.append(found["probs"])
    if len(runs) < 2:
        echo(f"ensemble: {len(runs)} full-length run(s) with validation probabilities; none chosen")
        return None
    labels = runs[0]["labels"]
    selection = greedy_select(probs, labels, metric, max_size)
    sign = -1 if mode == "max" else 1
    order = sorted(range(len(runs)), key=lambda i: (not math.isfinite(selection.values[i]), sign * selection.values[i]))
    candidates = [{"trial_id": runs[i]["trial_id"], "role": runs[i]["role"], "value": float(selection.values[i])}
                  for i in order]
    members = [{"trial_id": runs[i]["trial_id"], "role": runs[i]["role"], "count": int(selection.counts[i]),
                "weight": float(selection.weights[i]),
                "checkpoint": f"{filenames.TRIALS_DIR}/{runs[i]['trial_id']}/{filenames.BEST_CHECKPOINT}"}
               for i in sorted(np.flatnonzero(selection.counts), key=lambda i: -selection.counts[i])]
    steps = [{"added": runs[i]["trial_id"], "value": v} for i, v in selection.steps]
    document = choice_document(metric, mode, max_size, len(labels), candidates, members,
                               GreedyOutcome(steps, selection.stopped, selection.value))
    write_ensemble_choice(path, document)
    return document


def summary_lines(document: dict[str, Any]) -> list[str]:
    """summary.txt's ensemble section."""
    metric, single = document["metric"]["name"], document["best_single"]
    members = ", ".join(f"{m['trial_id']} x{m['count']}" for m in document["members"])
    return [f"ensemble ({filenames.ENSEMBLE_CHOICE}): greedy selection over {len(document['candidates'])} full-length "
            f"runs on the validation split; {metric} {single['value']:.4f} (best run {single['trial_id']} alone) -> "
            f"{document['ensemble_value']:.4f} ({len(document['members'])} member(s): {members}; "
            f"{document['stopped']})"]
