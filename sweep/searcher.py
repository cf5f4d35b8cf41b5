"""The Optuna side of a sweep: the sampler, a searcher that tells the study what really happened, the study.

Not a command; ``python -m sweep.run`` passes :class:`StudySearch` to Ray Tune. The study lives in
``results/<sweep>/optuna.db`` (``optuna-dashboard sqlite:///results/<sweep>/optuna.db``):

- a trial that ran every epoch is COMPLETE with its last epoch's value (the value trials.csv ranks by);
- a trial that ASHA stopped early is PRUNED, its value the last epoch it ran;
- a trial that raised is FAIL;
- every trial has each epoch's value as an intermediate value, step = epoch (from 1), and its Ray trial id
  as the user attribute ``ray_trial_id``.

With a budget of trial-epochs (``--budget``), the searcher says the search is finished once the sweep's
own trials have run that many epochs in all (counted from the study, so a resumed sweep counts its earlier
epochs too): trials that are running finish, so a sweep can spend up to one trial length per running
trial more. ASHA's spend depends on how the trials compare, so a budget, not a trial count, is what makes
sweeps of different trial lengths cost the same.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from core import filenames
from sweep.settings import metric_mode

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random")
RAY_TRIAL_ID = "ray_trial_id"     # user attribute of each Optuna trial: the Ray trial (folder trials/<id>/)


def make_sampler(kind: str, seed: int, slots: int, trials: int, conditional: bool) -> optuna.samplers.BaseSampler:
    """Seeded TPE set up for trials that run at once, or (for comparison) random search."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # group=True is "experimental"
        # multivariate: models the parameters jointly; group: a joint model per set of parameters that
        # occur together (conditional ones); constant_liar: trials still running count as bad results, so
        # trials started at once do not all get the same suggestion; n_startup_trials: random trials first
        # (TPE needs finished trials to learn from), a third of the trials up to Optuna's usual 10, and at
        # least one per slot (the first trials all start before any has finished).
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=conditional, constant_liar=True,
                                          n_startup_trials=startup_trials(slots, trials))


def startup_trials(slots: int, trials: int) -> int:
    return max(slots, min(10, trials // 3))


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch, telling the study each trial's real outcome and every epoch's value.

    Ray's own ``on_trial_complete`` marks every trial that reported the metric COMPLETE, so a trial that
    ASHA stopped after 2 epochs would count for TPE as if its 2-epoch value were a full training's; and
    Tune hands a trial's last result to ``on_trial_complete`` only, never to ``on_trial_result``, so its
    last epoch was missing from the intermediate values. Ray also reports at ``training_iteration``; here
    the step is core.train's own epoch number, which stays right across a resume.
    """

    def __init__(self, sample: Callable[[Any], dict[str, Any]], *, metric: str,
                 sampler: optuna.samplers.BaseSampler, storage_url: str, study_name: str, max_epochs: int,
                 budget: int | None = None):
        self.max_epochs, self.budget = max_epochs, budget
        self._steps: dict[str, set[int]] = {}  # epochs reported per trial (Optuna warns on a repeat)
        super().__init__(space=sample, metric=metric, mode=metric_mode(metric), sampler=sampler,
                         storage=optuna.storages.RDBStorage(storage_url), study_name=study_name)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    # The optuna.db a restored searcher uses: set by sweep.run before each Tune run. Why: Ray restores the
    # searcher pickled with the database's absolute path, and a sweep resumed in another results folder (from a
    # bucket, on another machine) must write to its own copy, not to a path of the first driver.
    resumed_database: str | None = None

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if StudySearch.resumed_database and self._storage.url != StudySearch.resumed_database:
            self._storage = optuna.storages.RDBStorage(StudySearch.resumed_database)
            self._ot_study = optuna.load_study(study_name=self._ot_study.study_name, storage=self._storage,
                                               sampler=self._sampler)
            self._ot_trials = {k: optuna.trial.Trial(self._ot_study, t._trial_id) for k, t in self._ot_trials.items()}

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.budget is not None and epochs_spent(self._ot_study) >= self.budget:
            return Searcher.FINISHED
        params = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ID, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        state, value = outcome(result, error, self.metric, self.max_epochs)
        if state is not TrialState.FAIL:
            self._report(trial_id, result or {})
        try:
            self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        except (ValueError, RuntimeError) as exc:  # already finished (told before a driver was killed)
            log.info("optuna trial of %s not updated: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def _report(self, trial_id: str, result: Mapping[str, Any]) -> None:
        value, epoch = result.get(self.metric), result.get("epoch")
        if value is None or epoch is None or not math.isfinite(float(value)) or trial_id not in self._ot_trials:
            return
        steps = self._steps.setdefault(trial_id, set())
        if int(epoch) not in steps:
            try:
                self._ot_trials[trial_id].report(float(value), int(epoch))
            except optuna.exceptions.UpdateFinishedTrialError as exc:  # told before a driver stopped; Ray resumed it
                log.info("optuna trial of %s not updated: %s", trial_id, exc)
            steps.add(int(epoch))


def outcome(result: Mapping[str, Any] | None, error: bool, metric: str,
            max_epochs: int) -> tuple[TrialState, float | None]:
    """The Optuna state and value of a finished trial from its last result."""
    value = (result or {}).get(metric)
    if error or value is None or not math.isfinite(float(value)):
        return TrialState.FAIL, None  # raised, never reported (stopped while pending), or no finite value
    if int((result or {}).get("epoch", 0)) >= max_epochs:
        return TrialState.COMPLETE, float(value)
    return TrialState.PRUNED, None     # Optuna takes the last intermediate value as its value


def epochs_spent(study: optuna.Study) -> int:
    """Epochs the sweep's own trials have reported (warm-start trials, which have no Ray trial id, excluded)."""
    return sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False) if RAY_TRIAL_ID in t.user_attrs)


def storage_url(sweep_dir: Path) -> str:
    return f"sqlite:///{sweep_dir / filenames.OPTUNA_DB}"


def load_study(sweep_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_url(sweep_dir))


def fail_orphans(study: optuna.Study) -> None:
    """Optuna trials left RUNNING by a killed driver: Ray never ran them to the end; mark them failed."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        log.info("optuna trial %d was left running by an interrupted driver: marked failed", trial.number)


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def ray_trial_numbers(study: optuna.Study) -> dict[str, int]:
    """Ray trial id -> Optuna trial number, for this sweep's own trials."""
    return {t.user_attrs[RAY_TRIAL_ID]: t.number for t in study.get_trials(deepcopy=False)
            if RAY_TRIAL_ID in t.user_attrs}


def importances(study: optuna.Study) -> tuple[dict[str, float], int] | None:
    """Optuna's parameter importances (its default evaluator) over the COMPLETE trials, and how many."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3:
        return None
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}, len(complete)
    except (RuntimeError, ValueError) as exc:  # e.g. no parameter common to all complete trials
        log.info("parameter importances not computed: %s", exc)
        return None
