"""``--warm-start SWEEP_DIR``: an earlier sweep's finished trials, to add to a new sweep's study first.

Not a command; ``python -m sweep.run --warm-start results/<earlier> ...`` uses it. The earlier sweep must
have run on the same dataset (fingerprint), with the same metric and the same fixed config (apart from
where trials run: device, precision, ...), and searched the same parameters; anything else is a one-line
error naming the mismatch. Its COMPLETE, PRUNED and FAIL trials are copied with their states, values,
parameters and per-epoch intermediate values (user attribute ``warm_start_from``: sweep and number);
a trial with a value this space cannot take (a narrower range) is left out and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from core import filenames
from core.io.state_files import read_json_object
from core.config import TrainConfig
from core.data.dataset import dataset_fingerprint
from core.errors import UserError
from sweep.settings import SETTINGS_FILE, SPACE_COPY, read_settings_file
from sweep.space import SearchSpace, parse_space

# Keys that change where and how fast a trial runs, not what it learns: they may differ.
EXECUTION_KEYS = ("device", "precision", "channels_last", "compile", "eval_batch_size")
COPIED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class WarmStart:
    source: Path
    trials: tuple[FrozenTrial, ...]   # ready for study.add_trials
    skipped: int                      # finished trials with a value outside this space

    def describe(self) -> str:
        states = [t.state.name for t in self.trials]
        counts = ", ".join(f"{states.count(s.name)} {s.name}" for s in COPIED)
        skipped = f"; {self.skipped} left out (values outside this space)" if self.skipped else ""
        return (f"warm start: {len(self.trials)} finished trial(s) of {self.source} added to the study "
                f"({counts}){skipped}")


def load_warm_start(source: str, space: SearchSpace, base: Mapping[str, Any], metric: str,
                    data: str | None) -> WarmStart:
    """Check ``source`` against this sweep (on dataset ``data``); read its finished trials (nothing is written)."""
    folder = Path(source).expanduser().resolve()
    where = f"--warm-start {source}"
    if not (folder / SETTINGS_FILE).is_file():
        raise UserError(f"{where}: not a sweep folder (no {SETTINGS_FILE})")
    doc = read_settings_file(folder, "no sweep settings")
    old = doc["settings"]
    if old.get("metric") != metric:
        raise UserError(f"{where}: it optimised {old.get('metric')}, this sweep {metric}")
    _check_fingerprint(folder, doc, data, where)
    _check_base(doc.get("base_config") or {}, base, space, where)
    old_space = parse_space((folder / SPACE_COPY).read_text(encoding="utf-8"), source=str(folder / SPACE_COPY))
    _check_names(old_space, space, where)
    db = folder / filenames.OPTUNA_DB
    if not db.is_file():
        raise UserError(f"{where}: no optuna.db in it")
    study = optuna.load_study(study_name=old["name"], storage=f"sqlite:///{db}")
    trials, skipped = [], 0
    for trial in study.get_trials(deepcopy=False, states=COPIED):
        if all(p.contains(trial.params[p.name]) for p in space.params if p.name in trial.params):
            trials.append(_copy(trial, space, old["name"]))
        else:
            skipped += 1
    return WarmStart(source=folder, trials=tuple(trials), skipped=skipped)


def _check_fingerprint(folder: Path, doc: Mapping[str, Any], data: str | None, where: str) -> None:
    fingerprint = dataset_fingerprint(data)
    old = (doc.get("data") or {}).get("fingerprint")
    best = folder / filenames.BEST_TRIAL
    if old is None and best.is_file():  # sweeps from before sweep.json recorded it
        old = (read_json_object(best, "no best.json").get("data") or {}).get("fingerprint")
    if old is None:
        raise UserError(f"{where}: cannot tell which dataset it ran on (no data fingerprint in its sweep.json "
                        f"or best.json)")
    if old != fingerprint:
        raise UserError(f"{where}: it ran on another dataset (fingerprint {old[:12]}, this one {fingerprint[:12]})")


def _check_base(old: Mapping[str, Any], new: Mapping[str, Any], space: SearchSpace, where: str) -> None:
    defaults = TrainConfig().to_dict()  # a key added to the config since that sweep: it ran with the default
    for key, value in new.items():
        if key in space.keys or key in EXECUTION_KEYS or key == "select_metric":
            continue
        before = old.get(key, defaults[key])
        if before != value:
            raise UserError(f"{where}: its trials ran with {key}={before!r}, this sweep's with {key}={value!r}")


def _check_names(old: SearchSpace, new: SearchSpace, where: str) -> None:
    for name in old.names:
        if name not in new.names:
            raise UserError(f"{where}: it searched '{name}', which {new.source} does not")
    for name in new.names:
        if name not in old.names:
            raise UserError(f"{where}: {new.source} searches '{name}', which it did not")
    for param in new.params:
        before = next(p for p in old.params if p.name == param.name)
        if (before.dist == "categorical") != (param.dist == "categorical") or before.when != param.when:
            raise UserError(f"{where}: '{param.name}' was {before.describe()} there, {param.describe()} here")


def _copy(trial: FrozenTrial, space: SearchSpace, sweep_name: str) -> FrozenTrial:
    return optuna.trial.create_trial(
        state=trial.state, values=trial.values if trial.state != TrialState.FAIL else None,
        params=dict(trial.params), distributions=space.distributions(trial.params),
        intermediate_values=dict(trial.intermediate_values),
        user_attrs={"warm_start_from": f"{sweep_name}#{trial.number}"})
