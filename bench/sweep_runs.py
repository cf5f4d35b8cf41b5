"""What the sweep benchmarks share: run one sweep quietly, score models on the test split, size ASHA sweeps.

Not a command; used by ``bench/hpo_efficacy.py`` and ``bench/final_fidelity.py``. Every sweep of a
benchmark shares one local Ray (:func:`start_ray` / :func:`stop_ray`); a sweep's console output goes to
``<results>/<name>.log``. Test scores come from a model file (a run's ``best.pt`` or a final ``model.pt``)
loaded through ``core.model.inference``, so every method's test figure is computed the same way.
"""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.errors import UserError

METRIC = "val_balanced_accuracy"
TEST_KEYS = ("test_balanced_accuracy", "test_accuracy", "test_macro_f1", "test_auc")


def sweep_run(settings: Any, resume: bool = False) -> dict[str, Any]:
    """Run the sweep of ``settings`` (a SweepSettings; ``resume``: continue it) and describe what it chose.

    Returns the chosen config's run folders (the winning trial's, or its confirmation runs'), the search
    trials, the trial-epochs really spent (search and confirmation), the selection value, the chosen trial,
    its params, the sweep folder and its best.json, optuna.db's state counts and the trials' statuses.
    """
    import pandas as pd

    from core import filenames
    from sweep import searcher
    from sweep.run import run_sweep

    start_ray(settings)
    results_root = Path(settings.results)
    results_root.mkdir(parents=True, exist_ok=True)
    log_path = results_root / f"{settings.name}.log"
    with open(log_path, "a" if resume else "w", encoding="utf-8") as output, contextlib.redirect_stdout(output), \
            contextlib.redirect_stderr(output):
        report = run_sweep(settings, resume=resume, echo=lambda line: print(line, file=output))
    if report.best is None:
        raise UserError(f"{settings.name}: no trial reported {settings.metric}; see {log_path}")
    folder, best = report.sweep_dir, report.best
    runs = best["confirmation"]["runs"] if best.get("confirmation") else [{"folder": f"trials/{best['trial_id']}"}]
    frame = pd.read_csv(folder / "trials.csv")
    return {"folders": [str(folder / run["folder"]) for run in runs], "trials": int((frame["role"] == "search").sum()),
            "trial_epochs": int(frame["epochs_run"].fillna(0).sum()), "selection_value": best["metric"]["value"],
            "chosen_trial": best["trial_id"], "params": best["params"], "sweep_dir": str(folder),
            "best_json": str(folder / filenames.BEST_TRIAL),
            "optuna_states": searcher.state_counts(searcher.load_study(folder, settings.name)),
            "statuses": frame[frame["role"] == "search"]["status"].value_counts().to_dict()}


def score_model(path: str | Path, data: Any) -> dict[str, Any]:
    """A model file on ``data``'s test split, with the epoch it was saved at and that epoch's val score."""
    from core.model.loading import load_for_inference
    from core.evaluation.metrics import classification_metrics

    test = data.indices("test")
    model = load_for_inference(path, device="cpu")
    scores = classification_metrics(data.labels[test], model.predict(np.asarray(data.images[test])), "test_")
    return {"model": str(path), "epoch": model.header["epoch"], "val": model.header["metrics"][METRIC], **scores}


def checkpoint_scores(folders: Sequence[str], data: Any) -> dict[str, Any]:
    """Each run folder's best.pt on the test split; the means are the method's figures."""
    from core import filenames

    per_run = [{"folder": folder, **score_model(Path(folder) / filenames.BEST_CHECKPOINT, data)} for folder in folders]
    mean = {key: statistics.fmean(r[key] for r in per_run) for key in ("val", *TEST_KEYS)}
    return {**mean, "drop": mean["val"] - mean["test_balanced_accuracy"], "per_run": per_run}


def trial_cap(asha: Any, budget: float) -> int:
    """The most trials of a sweep that stops at ``budget`` trial-epochs (``sweep.run --budget``): twice the
    trials whose expected trial-epochs under ``asha`` stay within it. High enough that the budget, not the
    count, ends the sweep (ASHA spends less than expected when a strong early trial stops later ones), and
    low enough that TPE's random start-up trials (a third of them, up to 10) leave room for its model."""
    from sweep.schedule import expected_budget

    trials = 1
    while expected_budget(asha, trials + 1, rounds=100) <= budget:
        trials += 1
    return 2 * trials


def start_ray(settings: Any) -> None:
    """One local Ray for every sweep of the benchmark (each sweep would otherwise start and stop its own)."""
    import os

    import ray

    from sweep.resources import connect_ray

    # Tune's own SIGINT handler ends only the running sweep, and the benchmark would go on to the next one.
    # The benchmark wants Ctrl+C to stop it whole.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    if not ray.is_initialized():
        connect_ray(settings, None, print)


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def mean_sd(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample sd (None for one value) and count."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def cell(stat: dict[str, Any], digits: int = 3) -> str:
    """A :func:`mean_sd` as a table cell: ``mean +- sd``."""
    if stat.get("mean") is None:
        return "n/a"
    sd = f" +- {stat['sd']:.{digits}f}" if stat.get("sd") is not None else ""
    return f"{stat['mean']:.{digits}f}{sd}"
