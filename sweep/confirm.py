"""Confirmation: the search's best configs trained again with new seeds, and ranked by their mean.

Not a command; ``python -m sweep.run`` runs it after the search (``--confirm-top K``, default 3, 0 turns
it off; ``--confirm-seeds S``, default 2). The K best trials that ran every epoch are each trained S
more times, for the full epochs, with the config key ``seed`` (model initialisation, shuffling,
augmentation; the split stays the same) set to the trials' seed + 1 .. + S, as ordinary Ray trials
sharing the machine. A config is then ranked by the mean of its search trial's value and its
confirmation runs' values: one lucky seed on a small validation split no longer picks the winner.

``results/<sweep>/confirm.json`` holds the plan, written before the first run; it also marks the search
as finished, so ``--resume`` goes on with the confirmation stage.
"""

from __future__ import annotations

import pickle
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from ray.tune.search import Searcher

from core.io import atomic, state_files
from core import filenames

CONFIRM_FILE = filenames.CONFIRM_PLAN
CONFIRM_FORMAT = "lesion-sweep/confirm"
CONFIRMS_KEY = "confirms"         # key of a confirmation run's Ray config: the search trial it repeats


@dataclass(frozen=True)
class ConfirmedConfig:
    """One confirmed config: its search trial's run first, then the confirmation runs that completed."""

    trial_id: str                    # the search trial whose config this is
    search_rank: int                 # 1: the search's top trial
    runs: tuple[dict[str, Any], ...]  # trial_id, role, seed, value, epochs_run, folder (relative to the sweep)

    @property
    def values(self) -> list[float]:
        return [run["value"] for run in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def describe(self) -> str:
        sd = f" +- {self.sd:.4f}" if self.sd is not None else ""
        return f"{self.mean:.4f}{sd} over {len(self.values)} run(s)"


def plan(frame: pd.DataFrame, metric: str, top: int, seeds: int, base_seed: int,
         params: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The confirmation runs: the ``top`` best search trials that completed, ``seeds`` new seeds each."""
    completed = frame[(frame["role"] == "search") & (frame["status"] == "completed") & frame[f"{metric}_final"].notna()]
    return [{CONFIRMS_KEY: trial_id, "seed": base_seed + k, "params": dict(params[trial_id])}
            for trial_id in completed["trial_id"].head(top) for k in range(1, seeds + 1)]


def write_plan(sweep_dir: Path, runs: Sequence[Mapping[str, Any]], top: int, seeds: int) -> None:
    atomic.write_json(sweep_dir / CONFIRM_FILE, {"format": CONFIRM_FORMAT, "version": 1, "top": top,
                                                 "seeds": seeds, "runs": [dict(r) for r in runs]})


def read_plan(sweep_dir: Path) -> list[dict[str, Any]] | None:
    """The saved plan, or None while the search has not finished."""
    path = sweep_dir / CONFIRM_FILE
    return state_files.read_json_object(path, "no confirmation plan")["runs"] if path.is_file() else None


def still_to_run(runs: Sequence[Mapping[str, Any]], frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The planned runs that have not completed (a resumed sweep whose confirmation Ray cannot restore)."""
    done = {(row.confirms, int(row.seed)) for row in frame.itertuples()
            if row.role == "confirm" and row.status == "completed"}
    return [dict(r) for r in runs if (r[CONFIRMS_KEY], int(r["seed"])) not in done]


def ray_config(run: Mapping[str, Any]) -> dict[str, Any]:
    """What a confirmation run's trial receives: the config's sampled values, its seed, what it confirms."""
    return {**run["params"], "seed": run["seed"], CONFIRMS_KEY: run[CONFIRMS_KEY]}


class PlanSearcher(Searcher):
    """Hands Ray Tune the planned runs one by one, then says it is finished."""

    def __init__(self, runs: Sequence[Mapping[str, Any]], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.configs = [ray_config(r) for r in runs]
        self.given = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        if self.given >= len(self.configs):
            return Searcher.FINISHED
        self.given += 1
        return dict(self.configs[self.given - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def ranked(frame: pd.DataFrame, runs: Sequence[Mapping[str, Any]], metric: str, mode: str) -> list[ConfirmedConfig]:
    """The confirmed configs, best mean first (ties: the better search rank)."""
    final = f"{metric}_final"
    search = frame[frame["role"] == "search"].reset_index(drop=True)
    rank = {trial_id: i + 1 for i, trial_id in enumerate(search["trial_id"])}
    configs = []
    for trial_id in dict.fromkeys(r[CONFIRMS_KEY] for r in runs):
        rows = pd.concat([search[search["trial_id"] == trial_id],
                          frame[(frame["role"] == "confirm") & (frame["confirms"] == trial_id)]])
        rows = rows[(rows["status"] == "completed") & rows[final].notna()]
        configs.append(ConfirmedConfig(trial_id=trial_id, search_rank=rank[trial_id], runs=tuple(
            {"trial_id": row.trial_id, "role": row.role, "seed": int(row.seed), "value": float(row.value),
             "epochs_run": int(row.epochs_run), "folder": f"trials/{row.trial_id}"}
            for row in rows.rename(columns={final: "value"}).itertuples())))
    sign = -1 if mode == "max" else 1
    return sorted(configs, key=lambda c: (sign * c.mean, c.search_rank))


def best_record(chosen: ConfirmedConfig, configs: Sequence[ConfirmedConfig]) -> dict[str, Any]:
    """best.json's ``confirmation``: the chosen config's values, mean and sd, and its runs."""
    return {"ranked_by": "mean of the search trial's value and its confirmation runs' values",
            "values": chosen.values, "mean": chosen.mean, "sd": chosen.sd, "runs": list(chosen.runs),
            "search_rank": chosen.search_rank,
            "configs": [{"trial_id": c.trial_id, "search_rank": c.search_rank, "mean": c.mean, "sd": c.sd,
                         "values": c.values} for c in configs]}


def summary_lines(configs: Sequence[ConfirmedConfig], metric: str, seeds: int) -> list[str]:
    """summary.txt's confirmation section."""
    if not configs:
        return []
    lines = [f"confirmation: the top {len(configs)} config(s) trained again with {seeds} new seed(s) each; "
             f"ranked by the mean {metric}:"]
    for place, config in enumerate(configs, 1):
        lines.append(f"  {place}. trial {config.trial_id} (search rank {config.search_rank}): {config.describe()} "
                     f"[{', '.join(f'{v:.4f}' for v in config.values)}]")
    if configs[0].search_rank != 1:
        top = next((c for c in configs if c.search_rank == 1), None)
        lost = f" (now {configs.index(top) + 1}.)" if top is not None else ""
        lines.append(f"  the search's top trial lost its place{lost}: trial {configs[0].trial_id} "
                     f"(search rank {configs[0].search_rank}) is chosen")
    return lines
