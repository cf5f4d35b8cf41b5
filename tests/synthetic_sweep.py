"""A sweep folder written directly, without training: the input of sweep/report.py's tests and of
``python -m bench.report_size`` (a test helper that the benchmark shares; one copy, here).

Not a command. :func:`make_sweep` writes what
``python -m sweep.run`` leaves (sweep.json, space.yaml, splits.csv, optuna.db, trials.csv,
trials/<id>/trial.json and metrics.csv, best.json) for ``trials`` trials of
search_spaces/quick.yaml with made-up learning curves: completed, stopped early (PRUNED in
optuna.db, with a value per epoch, as issue 16 stores them), failed and still running trials, and
confirmation runs of the best configs (``role`` = confirm in trials.csv; not in optuna.db).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from core.io import atomic
from core import filenames
from core.best_file import BestChoice, write_best

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "quick.yaml"
METRIC = "val_balanced_accuracy"
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


@dataclass(frozen=True)
class SweepShape:
    """What :func:`make_sweep` writes: how many trials of each kind, how long, and which files."""

    trials: int = 12               # search trials
    epochs: int = 6                # epochs of a trial that runs them all
    failed: int = 1
    running: int = 1
    confirm: int = 2               # confirmation runs of the best configs
    role_column: bool = True       # False: trials.csv as sweeps wrote it before the confirmation stage
    seed: int = 0
    with_best: bool = True         # write best.json
    data: str = "/data/HAM10000"   # best.json's and sweep.json's data path


def make_sweep(folder: Path, shape: SweepShape = SweepShape()) -> Path:
    """Write a sweep of ``shape.trials`` search trials (plus ``shape.confirm`` confirmation runs) into ``folder``."""
    import optuna

    from sweep.outputs import write_trial, write_trials_csv
    from sweep.settings import SweepSettings, base_config, save_settings
    from sweep.space import parse_space

    folder = Path(folder)
    rng = random.Random(shape.seed)
    space_text = SPACE.read_text(encoding="utf-8")
    space = parse_space(space_text, source=str(SPACE))
    settings = SweepSettings(name=folder.name, results=str(folder.parent), space="search_spaces/quick.yaml",
                             data=shape.data, max_epochs=shape.epochs, trials=shape.trials, seed=shape.seed, gpus=1,
                             gpus_per_trial=0.5)
    base = base_config(space, settings)
    data_record = {"path": shape.data, "fingerprint": "0" * 40, "layout": "ham10000"}
    save_settings(settings, space_text, base, data_record)
    _write_splits(folder / filenames.SPLITS, rng)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Asked and told in memory, then copied into optuna.db at once (a transaction per report would be slow).
    memory = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=settings.name, direction="maximize", storage=memory,
                                sampler=optuna.samplers.RandomSampler(seed=shape.seed))
    started = time.time() - 3600.0
    records = _search_trials(folder, study, space, shape, rng, started)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(folder / filenames.OPTUNA_DB).resolve()}")
    optuna.copy_study(from_study_name=settings.name, from_storage=memory, to_storage=storage)

    ranked = sorted((r for r in records if r["status"] == "completed"), key=lambda r: -r["final"][METRIC])
    confirmed = _confirm_runs(folder, ranked, shape, rng, started)
    for record in records + confirmed:
        write_trial(folder, record)
    frame = write_trials_csv(folder, space.names, METRIC, "max")
    if not shape.role_column:  # trials.csv as sweeps wrote it before the confirmation stage
        atomic.write_text(folder / filenames.TRIALS_CSV, frame.drop(columns=["role", "confirms"]).to_csv(index=False))
    if shape.with_best and ranked:
        _write_best(folder, ranked[0], confirmed, base.to_dict(), data_record, shape)
    return folder


def _search_trials(folder: Path, study: Any, space: Any, shape: SweepShape, rng: random.Random,
                   started: float) -> list[dict[str, Any]]:
    """The search trials, told to the in-memory ``study`` as Optuna would be told, and their records."""
    import optuna

    later = ["failed"] * shape.failed + ["running"] * shape.running
    later = ["search"] * (shape.trials - 2 - len(later)) + later
    rng.shuffle(later)
    states = ["search", "search"] + later  # the first two complete: every figure has something to draw
    epochs, records = shape.epochs, []
    for number, kind in enumerate(states):
        trial = study.ask()
        params = space.sample(trial)
        quality = _quality(params)
        stop = epochs if number < 2 or rng.random() < 0.4 else rng.choice([2, 3]) if epochs > 3 else epochs
        if kind == "running":
            stop = rng.randint(0, max(0, epochs - 1))
        if kind == "failed":
            stop = rng.randint(0, 1)
        curve = [_value(quality, e, epochs, rng) for e in range(1, stop + 1)]
        for epoch, value in enumerate(curve, start=1):
            trial.report(value, epoch)
        status = {"failed": "failed", "running": "running"}.get(kind) or (
            "completed" if stop >= epochs else "stopped early")
        if status == "completed":
            study.tell(trial, curve[-1])
        elif status == "stopped early":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif status == "failed":
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        trial_id = f"{rng.getrandbits(32):08x}"
        records.append(_record(folder, trial_id, params, status, curve, started + 20.0 * number, number))
    return records


def _confirm_runs(folder: Path, ranked: list[dict[str, Any]], shape: SweepShape, rng: random.Random,
                  started: float) -> list[dict[str, Any]]:
    """Confirmation runs of the best configs in turn, all epochs."""
    records = []
    for k in range(shape.confirm):
        source = ranked[k % len(ranked)]
        curve = [_value(_quality(source["params"]), e, shape.epochs, rng) for e in range(1, shape.epochs + 1)]
        trial_id = f"{rng.getrandbits(32):08x}"
        number = shape.trials + k
        records.append({**_record(folder, trial_id, source["params"], "completed", curve, started + 20.0 * number,
                                  number),
                        "role": "confirm", "confirms": source["trial_id"], "seed": shape.seed + 1 + k})
    return records


def _write_best(folder: Path, top: dict[str, Any], confirmed: list[dict[str, Any]], base: dict[str, Any],
                data_record: dict[str, str], shape: SweepShape) -> None:
    best = BestChoice(config={**base, **top["params"]}, metric=METRIC, value=top["final"][METRIC], mode="max",
                      trial_id=top["trial_id"], data=data_record, params=top["params"],
                      sweep={"name": folder.name, "trials": shape.trials},
                      trial_epochs={"budget": shape.epochs, "runs": {top["trial_id"]: shape.epochs}}).document()
    if confirmed:  # as sweep/confirm.py records it; the metric's value is then the mean
        values = [top["final"][METRIC]] + [r["final"][METRIC] for r in confirmed]
        mean = sum(values) / len(values)
        best["metric"]["value"] = mean
        best["confirmation"] = {
            "ranked_by": "mean of the search trial's value and its confirmation runs' values",
            "values": values, "mean": mean, "sd": _sd(values, mean), "search_rank": 1,
            "runs": [{"trial_id": t, "epochs_run": shape.epochs} for t in [top["trial_id"],
                                                                          *(r["trial_id"] for r in confirmed)]],
            "configs": [{"trial_id": top["trial_id"], "search_rank": 1, "mean": mean, "sd": _sd(values, mean),
                         "values": values}]}
    write_best(folder / filenames.BEST_TRIAL, best)


def _quality(params: dict[str, Any]) -> float:
    """How good a config is, made up: best near lr 2e-3, sqrt_inverse weighting helps."""
    q = 0.62 - 0.08 * (math.log10(params["lr"]) - math.log10(2e-3)) ** 2
    q += {"none": 0.0, "sqrt_inverse": 0.04, "effective": 0.02}[params["class_weighting"]]
    return q - 0.2 * abs(params["label_smoothing"] - 0.05)


def _value(quality: float, epoch: int, epochs: int, rng: random.Random) -> float:
    return max(0.0, min(1.0, quality * (1 - 0.6 * math.exp(-3 * epoch / epochs)) + rng.gauss(0, 0.01)))


def _record(folder: Path, trial_id: str, params: dict[str, Any], status: str, curve: list[float], t0: float,
            number: int) -> dict[str, Any]:
    run = folder / filenames.TRIALS_DIR / trial_id
    rows = [{"epoch": float(e), METRIC: v, "val_loss": 1.5 - v, "val_accuracy": v + 0.1, "train_loss": 1.4 - v}
            for e, v in enumerate(curve, start=1)]
    if rows:
        atomic.write_text(run / filenames.METRICS_CSV, pd.DataFrame(rows).to_csv(index=False))
    duration = 30.0 * max(1, len(curve))
    final = rows[-1] if rows and status != "running" else None
    best = max(rows, key=lambda r: r[METRIC]) if rows and status != "running" else None
    return {"trial_id": trial_id, "params": params, "started": t0, "status": status,
            "error": "RuntimeError: CUDA out of memory (made up)" if status == "failed" else None,
            "ended": None if status == "running" else t0 + duration, "epochs_run": len(curve) if final else None,
            "duration_s": None if status == "running" else duration, "final": final, "best": best,
            "node": {"trial_id": trial_id, "hostname": "node-a", "node_ip": "10.0.0.1",
                     "gpu_ids": [str(number % 2)], "cpus": 4, "gpus": 0.5}}


def _write_splits(path: Path, rng: random.Random) -> None:
    rows = [{"image_id": f"ISIC_{i:07d}", "label": CLASSES[rng.randrange(len(CLASSES))], "group": f"HAM_{i // 2:07d}",
             "split": rng.choices(("train", "val", "test"), weights=(70, 15, 15))[0]} for i in range(400)]
    atomic.write_text(path, pd.DataFrame(rows).to_csv(index=False))


def _sd(values: list[float], mean: float) -> float:
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
