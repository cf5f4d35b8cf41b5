"""Which configuration a sweep hands on, written as ``results/<sweep>/best.json`` (schema and writer:
core/best_file.py).

Not a command. The chosen config is the search's best trial that ran every epoch (a trial stopped early only
when none did), or, after a confirmation stage, the confirmed config with the best mean (sweep/confirm.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from core import filenames
from core.best_file import BestChoice, write_best
from core.config import TrainConfig
from core.metric_names import finite_or_none
from sweep.confirm import ConfirmedConfig, best_record
from sweep.outputs import read_trial
from sweep.settings import SweepSettings
from sweep.space import config_values


def choose_and_write(settings: SweepSettings, frame: pd.DataFrame, confirmed: Sequence[ConfirmedConfig],
                     base: TrainConfig, data: Mapping[str, str]) -> dict[str, Any] | None:
    """Pick the config to hand on, write best.json, and return its contents (None: no trial has a value)."""
    sweep_dir, metric = settings.sweep_dir, settings.metric
    final = f"{metric}_final"
    ranked = frame[(frame["role"] == "search") & frame[final].notna() & (frame["status"] != "failed")]
    if ranked.empty:
        return None
    trial_id = confirmed[0].trial_id if confirmed else ranked.iloc[0]["trial_id"]
    row = ranked[ranked["trial_id"] == trial_id].iloc[0]
    params = read_trial(sweep_dir, trial_id)["params"]
    config = TrainConfig.from_dict(config_values(params), base=base)  # as the trial built it (sweep/trainable.py)
    checkpoint = Path(filenames.TRIALS_DIR) / trial_id / filenames.BEST_CHECKPOINT
    runs = confirmed[0].runs if confirmed else ({"trial_id": trial_id, "epochs_run": int(row["epochs_run"])},)
    how = {"name": settings.name, "space": str(settings.space), "trials": settings.trials,
           "scheduler": settings.scheduler, "sampler": settings.sampler, "seed": settings.seed}
    best = BestChoice(
        config=config.to_dict(), metric=metric, value=confirmed[0].mean if confirmed else float(row[final]),
        mode=settings.mode, trial_id=trial_id, data=data, params=params,
        checkpoint=str(checkpoint) if (sweep_dir / checkpoint).is_file() else None,
        trial_epochs={"budget": base.epochs, "runs": {r["trial_id"]: r["epochs_run"] for r in runs}},
        confirmation=best_record(confirmed[0], confirmed) if confirmed else None,
        sweep={**how, "search_value": float(row[final]), "best_epoch_value": finite_or_none(row[f"{metric}_best"])},
    ).document()
    write_best(sweep_dir / filenames.BEST_TRIAL, best)
    return best


