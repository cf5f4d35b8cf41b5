"""The Optuna and ASHA side of a sweep without running one: concurrent suggestions, rungs for any trial length."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from ray.tune.search import Searcher

from sweep.schedule import Asha, expected_budget
from sweep.searcher import StudySearch, epochs_spent, make_sampler, startup_trials
from sweep.settings import SweepSettings
from sweep.space import load_space, parse_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
SPACE = parse_space("params:\n  lr: {dist: loguniform, low: 1.0e-4, high: 1.0e-1}\n"
                    "  label_smoothing: {dist: uniform, low: 0.0, high: 0.2}\n")


def _two_concurrent_suggestions(sampler: optuna.samplers.BaseSampler, tmp_path: Path, name: str) -> list[dict]:
    """Ray asks StudySearch for two trials before either has finished; 12 finished trials are known (best lr
    near 3e-3), so TPE is past its random start-up trials."""
    search = StudySearch(SPACE.sample, metric="val_balanced_accuracy", sampler=sampler,
                         storage_url=f"sqlite:///{tmp_path / 'optuna.db'}", study_name=name, max_epochs=4)
    rng = np.random.default_rng(0)
    for _ in range(12):
        params = {"lr": float(10 ** rng.uniform(-4, -1)), "label_smoothing": float(rng.uniform(0, 0.2))}
        search.study.add_trial(optuna.trial.create_trial(params=params, distributions=SPACE.distributions(params),
                                                         value=-abs(math.log10(params["lr"]) + 2.5)))
    return [search.suggest("first"), search.suggest("second")]


def test_constant_liar_gives_concurrent_trials_different_configs(tmp_path: Path) -> None:
    first, second = _two_concurrent_suggestions(make_sampler("tpe", 0, 2, 30, conditional=False), tmp_path, "liar")
    assert first != second
    # The same sampler without the liar: same first suggestion, but the second one ignores the running trial.
    plain = optuna.samplers.TPESampler(seed=0, multivariate=True, constant_liar=False,
                                       n_startup_trials=startup_trials(2, 30))
    plain_first, plain_second = _two_concurrent_suggestions(plain, tmp_path, "plain")
    assert plain_first == first and plain_second != second


def test_startup_trials_cover_the_slots() -> None:
    assert startup_trials(slots=1, trials=20) == 6 and startup_trials(slots=1, trials=100) == 10
    assert startup_trials(slots=8, trials=12) == 8


@pytest.mark.parametrize("space_file", sorted(p.name for p in SPACES.glob("*.yaml")))
def test_asha_rungs_are_valid_for_any_trial_length(space_file: str) -> None:
    space = load_space(SPACES / space_file)
    for max_epochs in range(1, 121):
        asha = SweepSettings(name="x", results="r").asha(space, max_epochs)
        scheduler = asha.scheduler()  # Ray's own checks (grace period <= max_t, ...) pass
        ray_rungs = sorted(math.ceil(m - 1e-9) for m, _ in scheduler._brackets[0]._rungs if m < max_epochs)
        assert asha.rungs == ray_rungs, max_epochs  # what `python -m sweep.space` says is what Ray does
        assert all(1 <= r < max_epochs for r in asha.rungs) and asha.rungs == sorted(set(asha.rungs))
        assert 1 <= asha.grace_period <= max_epochs


def test_default_space_budget_is_a_small_multiple_of_one_training() -> None:
    """The multiple stated in search_spaces/default.yaml and the README (20 trials, 50 epochs)."""
    asha = SweepSettings(name="x", results="r").asha(load_space(SPACES / "default.yaml"), 50)
    multiple = expected_budget(asha, trials=20) / 50
    assert 5 < multiple < 8
    assert expected_budget(Asha.for_trials(50, 50, 3), trials=20) == 20 * 50  # no rung: every trial runs 50


def test_budget_finishes_the_search_once_the_trials_ran_that_many_epochs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def searcher(budget: int | None) -> StudySearch:
        return StudySearch(SPACE.sample, metric="val_balanced_accuracy", sampler=optuna.samplers.RandomSampler(0),
                           storage_url=url, study_name="budget", max_epochs=4, budget=budget)

    search = searcher(budget=6)
    warm = {"lr": 1e-3, "label_smoothing": 0.1}  # a warm-start trial: its epochs are not this sweep's spend
    search.study.add_trial(optuna.trial.create_trial(params=warm, distributions=SPACE.distributions(warm), value=0.5,
                                                     intermediate_values={1: 0.4, 2: 0.5}))
    for trial_id, epochs in (("a", 4), ("b", 1)):
        assert isinstance(search.suggest(trial_id), dict)
        for epoch in range(1, epochs + 1):
            search.on_trial_result(trial_id, {"val_balanced_accuracy": 0.1 * epoch, "epoch": epoch})
    assert search.suggest("c") is not Searcher.FINISHED  # 5 of 6 spent: one more may start
    search.on_trial_result("b", {"val_balanced_accuracy": 0.2, "epoch": 2})
    assert epochs_spent(search.study) == 6 and search.suggest("d") == Searcher.FINISHED
    # a resumed sweep's searcher counts the epochs already in optuna.db; without a budget it never finishes
    assert searcher(budget=6).suggest("e") == Searcher.FINISHED
    assert isinstance(searcher(budget=None).suggest("f"), dict)
