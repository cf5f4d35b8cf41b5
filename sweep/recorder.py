"""The driver-side record of every trial: ``trials/<id>/trial.json``, TensorBoard HParams and ``trials.csv``.

Not a command; ``python -m sweep.run`` passes :class:`TrialRecorder` to Ray Tune as a callback. It sees
each trial start and end (completed, stopped early by the scheduler, or failed with its error) in the
driver, including trials that a scheduler stops, whose own process is killed without notice.
Everything it writes is also rebuilt from Ray's results at the end (:meth:`TrialRecorder.reconcile`),
so a driver killed between a trial's end and its record loses nothing after ``--resume``.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from core import filenames
from core.io.storage import storage_fault
from sweep import hparams
from sweep.outputs import (EXPERIMENTS, best_of, epoch_history, read_trial, read_trials, trials_dir, write_trial,
                            write_trials_csv)
from sweep.confirm import CONFIRMS_KEY
from sweep.trainable import NODE_FILE, FailedBefore

if TYPE_CHECKING:
    from ray.tune import Result
    from ray.tune.experiment import Trial

    from sweep.storage import SweepStorage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialTerms:
    """The sweep-wide facts a trial's record is judged by (the same for every trial of one sweep)."""

    metric: str       # the metric the sweep optimises, e.g. "val_balanced_accuracy"
    mode: str         # "max" or "min"
    max_epochs: int   # a trial that ran this many epochs completed; fewer: stopped early
    base_seed: int    # the seed of a trial whose parameters hold none


class TrialRecorder(tune.Callback):
    """Writes each trial's record when it starts and ends, and the trials table after every end.

    ``role`` is "search" for the search's trials and "confirm" for the confirmation runs (sweep/confirm.py).
    """

    def __init__(self, sweep_dir: Path, param_names: Sequence[str], terms: TrialTerms, role: str = "search",
                 remote: SweepStorage | None = None):
        self.sweep_dir = Path(sweep_dir)
        self.remote = remote              # a sweep in a bucket, else None
        self.param_names = tuple(param_names)
        self.metric, self.mode, self.max_epochs = terms.metric, terms.mode, terms.max_epochs
        self.base_seed, self.role = terms.base_seed, role

    # --- Tune callback hooks (run in the driver) --------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: object) -> None:
        self.started(trial.trial_id, trial.config)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: object) -> None:
        self.finished(trial.trial_id, trial.config, trial.last_result, error=None)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: object) -> None:
        self.finished(trial.trial_id, trial.config, trial.last_result, error=error_message(_trial_error(trial)))

    # --- the records -------------------------------------------------------------------------------
    def started(self, trial_id: str, params: Mapping[str, Any]) -> None:
        config = json_values(params)
        record = read_trial(self.sweep_dir, trial_id) or {
            "trial_id": trial_id, "role": self.role, "confirms": config.pop(CONFIRMS_KEY, None),
            "seed": config.get("seed", self.base_seed), "params": config, "started": time.time()}
        record.update(status="running", error=None)
        run_dir = trials_dir(self.sweep_dir) / trial_id
        if not record.get("hparams_written"):
            hparams.write_session_start(run_dir, trial_id, record["params"], record["started"])
            record["hparams_written"] = True
        write_trial(self.sweep_dir, record)
        if self.remote:
            self.remote.push_trial_record(self.sweep_dir, trial_id)
            self.remote.push_driver(self.sweep_dir)  # optuna.db now holds the trial Ray will save in its state

    def finished(self, trial_id: str, params: Mapping[str, Any], last_result: Mapping[str, Any] | None,
                 error: str | None) -> dict[str, Any]:
        record = read_trial(self.sweep_dir, trial_id)
        if record is None:  # failed before it started, or its start was never recorded
            self.started(trial_id, params)
            record = read_trial(self.sweep_dir, trial_id)
        last = dict(last_result or {})
        run_dir = trials_dir(self.sweep_dir) / trial_id
        if self.remote:  # the trial's own files, as its worker uploaded them
            self.remote.fetch_trial(self.sweep_dir, trial_id)
        history = epoch_history(run_dir, last.get("epoch"))
        # core.train's own row of the last epoch Tune received; Tune's copy where the folder is elsewhere.
        final = dict(history[-1]) if history else {
            k: float(v) for k, v in last.items()
            if k not in AUTO_RESULT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        best = best_of(history, self.metric, self.mode)
        epochs = int(final.get("epoch", 0))
        status = "failed" if error else "completed" if epochs >= self.max_epochs else "stopped early"
        ended = time.time()
        record.update(status=status, error=error, ended=ended, epochs_run=epochs,
                      duration_s=float(last.get("time_total_s") or ended - record["started"]),
                      final=final or None, best=dict(best) if best else None, node=_node_info(run_dir))
        hparams.write_session_end(run_dir, {
            f"sweep/{self.metric}_final": final.get(self.metric),
            f"sweep/{self.metric}_best": best.get(self.metric) if best else None,
            "sweep/epochs_run": epochs}, failed=error is not None, step=epochs)
        write_trial(self.sweep_dir, record)
        self.write_table()
        if self.remote:
            self.remote.push_trial_record(self.sweep_dir, trial_id)
            self.remote.push_driver(self.sweep_dir)
        log.info("trial %s %s after %d epoch(s)%s", trial_id, status, epochs, f": {error}" if error else "")
        if not storage_fault(error):
            self._drop_resume_state(run_dir, trial_id)
        elif self.remote:  # the sweep stops (one line); --resume trains the trial on from its checkpoint, kept
            self.remote.stop_for(trial_id, error)
        return record

    def _drop_resume_state(self, run_dir: Path, trial_id: str) -> None:
        """Resume state is only needed while a trial runs: drop it, and Ray's copies (about 3x the model
        each); best.pt, the trial's best epoch, stays."""
        if self.remote:
            self.remote.drop_resume_state(EXPERIMENTS[self.role], trial_id)
        (run_dir / filenames.LAST_CHECKPOINT).unlink(missing_ok=True)
        ray_copies = self.sweep_dir / EXPERIMENTS[self.role] / trial_id
        for copy in ray_copies.glob(f"checkpoint_*/{filenames.LAST_CHECKPOINT}"):
            copy.unlink(missing_ok=True)

    def reconcile(self, results: Iterable[Result]) -> Any:
        """Record trials whose end the callbacks missed (a driver killed at the wrong moment); the table."""
        known = set()
        for result in results:
            trial_id = Path(result.path).name
            known.add(trial_id)
            record = read_trial(self.sweep_dir, trial_id)
            if record is not None and record.get("status") not in ("running", None):
                continue
            error = error_message(result.error) if result.error else None
            self.finished(trial_id, result.config or {}, result.metrics, error)
        for record in read_trials(self.sweep_dir):
            if record.get("status") == "running" and record["trial_id"] not in known \
                    and record.get("role", "search") == self.role:
                # Started just before a driver was killed, after Ray's last saved state: the resumed sweep
                # never heard of it and drew another trial in its place. Its partial run would be a stray row.
                shutil.rmtree(trials_dir(self.sweep_dir) / record["trial_id"], ignore_errors=True)
                if self.remote:
                    self.remote.drop_trial(record["trial_id"])
                log.info("removed trial %s: it started after the interrupted sweep's last saved state, and "
                         "the resumed sweep ran another trial in its place", record["trial_id"])
        return self.write_table()

    def write_table(self) -> Any:
        return write_trials_csv(self.sweep_dir, self.param_names, self.metric, self.mode)


def json_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """Sampled values as plain JSON (numpy scalars unwrapped), keeping ints ints for TrainConfig."""
    return {k: v.item() if hasattr(v, "item") and callable(v.item) else v for k, v in params.items()}


def error_message(error: BaseException | str | None) -> str:
    """One line naming the exception a trial raised (Ray wraps it in a RayTaskError)."""
    if error is None:
        return "unknown error"
    if isinstance(error, str):  # the text trace Ray keeps when the exception could not be pickled
        lines = [line for line in error.splitlines() if line.strip()]
        return _one_line(lines[-1] if lines else "unknown error")
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, FailedBefore):  # the error it failed with the first time, unchanged
        return _one_line(str(cause))
    return _one_line(f"{type(cause).__name__}: {cause}")


def _trial_error(trial: Trial) -> BaseException | str | None:
    """The exception of a failed trial, from the files Ray has just written on this node."""
    from ray import cloudpickle

    pickled, text = trial.pickled_error_file, trial.error_file
    if pickled and Path(pickled).is_file():
        with open(pickled, "rb") as f:
            return cloudpickle.load(f)
    if text and Path(text).is_file():
        return Path(text).read_text(encoding="utf-8", errors="replace")
    return trial.get_pickled_error() or trial.get_error()


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _node_info(run_dir: Path) -> dict[str, Any] | None:
    import json

    path = run_dir / NODE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
