"""Hyperparameter sweep: core/'s training run as a Ray Tune trainable, searched by Optuna (seeded TPE).

    python -m sweep.run --gpus 4 --trials 40 --data ../shared/data/ham10000-200x150
    python -m sweep.run --gpus 1 --gpus-per-trial 0.25 --trials 40 --data DATA    # 4 trials per GPU
    python -m sweep.run --gpus 0 --space search_spaces/quick.yaml --trials 4      # CPU only
    python -m sweep.run --warm-start results/OLD --data DATA ...                  # learn from an earlier sweep
    python -m sweep.run --resume --name NAME                                       # after a crash
    python -m sweep.run --address auto ...                                         # a running Ray cluster

Two stages: the search (Optuna suggests, ASHA stops poor trials early; sweep/searcher.py,
sweep/schedule.py), then the confirmation of its best configs with new seeds (sweep/confirm.py).
Outputs go to ``results/<name>/`` (see sweep/outputs.py): best.json for
``python -m core.final_train results/<name>/best.json``, trials.csv, the Optuna study (optuna.db),
TensorBoard runs (``tensorboard --logdir results/<name>``) and a summary printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import pandas as pd

from core.io import atomic
from core import filenames
from core.best_file import SPLITS_ADVICE
from core.config import TrainConfig
from core.errors import UserError, run_cli
from core.io.state_files import check_output_dir, reading
from core.data.dataset import load_for_config
from core.data.splits import write_splits
from sweep.ensemble import summary_lines as ensemble_summary
from sweep.outputs import EXPERIMENTS, read_trials, set_field, summary_text
from sweep.report import refresh_sweep_page
from sweep.resources import connect_ray, plan_on_ray
from sweep.settings import (DEFAULT_SPACE, SEARCH_OPTIONS, SETTINGS_FILE, SPACE_COPY, SweepSettings, add_options,
                            base_config, flag, latest_sweep, load_settings, read_text, save_settings)
from sweep.space import SearchSpace, parse_space
from sweep.state_check import check_resumable

if TYPE_CHECKING:  # these import Ray, Optuna or the storage layer: only when a sweep runs
    import optuna
    from ray import tune
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    from sweep.recorder import TrialRecorder
    from sweep.storage import SweepStorage
    from sweep.warm_start import WarmStart

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
Echo = Callable[[str], None]


@dataclass(frozen=True)
class SweepResult:
    sweep_dir: Path
    best: dict[str, Any] | None
    summary: str
    trials: Any                       # the trials table (pandas DataFrame)


@dataclass(frozen=True)
class SweepRun:
    """What the stages of one sweep share."""

    settings: SweepSettings
    space: SearchSpace
    base: TrainConfig
    resources: Any                    # sweep.resources.Resources
    trainable: Any                    # the Ray Tune trainable, data and resources attached
    echo: Echo
    remote: SweepStorage | None = None   # with --storage, else None

    @property
    def folder(self) -> Path:
        return self.settings.sweep_dir

    def recorder(self, role: str) -> TrialRecorder:
        from sweep.recorder import TrialRecorder, TrialTerms

        terms = TrialTerms(self.settings.metric, self.settings.mode, self.base.epochs, self.base.seed)
        return TrialRecorder(self.folder, self.space.names, terms, role=role, remote=self.remote)


def run_sweep(settings: SweepSettings, *, resume: bool = False, address: str | None = None,
              echo: Echo = print) -> SweepResult:
    """Run (or, with ``resume``, continue) a sweep; Ray is started here unless it already runs."""
    started = time.time()
    settings.check()
    folder = check_output_dir(settings.sweep_dir, "--results/--name")
    remote = _remote(settings, resume)
    if resume:
        check_resumable(folder)
    space, space_text = _space(settings, resume)
    base = base_config(space, settings)
    missing = [m for m in ("ray", "optuna") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the sweep needs {' and '.join(missing)}, not installed in {sys.prefix}: "
                        f"pip install -c constraints.txt -e .")
    warm = None if resume or not settings.warm_start else _warm_start(settings, space, base)

    import ray

    connected = connect_ray(settings, address, echo)
    try:
        sweep, data = _prepare(settings, space, space_text, base, resume, echo, remote)
        return _run(sweep, data, resume, warm, started)
    finally:
        if connected:
            ray.shutdown()


def _remote(settings: SweepSettings, resume: bool) -> SweepStorage | None:
    """With --storage: the bucket is checked before any work (and --resume fetches the sweep's files)."""
    if not settings.storage:
        return None
    from sweep.storage import SweepStorage

    remote = SweepStorage.open(settings.storage, settings.storage_endpoint, settings.name)
    if resume:
        remote.fetch_sweep(settings.sweep_dir)
    else:
        remote.check_new()
    return remote


def _space(settings: SweepSettings, resume: bool) -> tuple[SearchSpace, str]:
    folder = settings.sweep_dir
    if resume:
        text = read_text(folder / SPACE_COPY)
        return parse_space(text, source=str(folder / SPACE_COPY)), text
    if (folder / SETTINGS_FILE).exists():
        raise UserError(f"{folder} already holds a sweep: --resume continues it, or choose another --name")
    text = read_text(Path(settings.space))
    return parse_space(text, source=settings.space), text


def _warm_start(settings: SweepSettings, space: SearchSpace, base: TrainConfig) -> WarmStart:
    from sweep.warm_start import load_warm_start

    return load_warm_start(settings.warm_start, space, base.to_dict(), settings.metric, settings.data)


def _run(sweep: SweepRun, data: dict[str, str], resume: bool, warm: WarmStart | None,
         started: float) -> SweepResult:
    """The two stages, each skipped where an interrupted sweep had finished it."""
    from sweep import confirm

    settings = sweep.settings
    runs = confirm.read_plan(sweep.folder) if resume else None
    if runs is None:  # the search has not finished (confirm.json marks its end)
        frame = _search(sweep, resume, warm)
        runs = confirm.plan(frame, settings.metric, settings.confirm_top, settings.confirm_seeds, sweep.base.seed,
                            {t: r["params"] for t, r in _records(sweep.folder).items()})
        confirm.write_plan(sweep.folder, runs, settings.confirm_top, settings.confirm_seeds)
        if sweep.remote:
            sweep.remote.push_records(sweep.folder)
    frame = _confirm(sweep, runs, resume) if runs else sweep.recorder("search").write_table()
    return _finish(sweep, frame, runs, data, started)


def _prepare(settings: SweepSettings, space: SearchSpace, space_text: str, base: TrainConfig, resume: bool,
             echo: Echo, remote: SweepStorage | None) -> tuple[SweepRun, dict[str, str]]:
    """Plan the resources, load the data (once, for every trial), save the settings and split; the trainable."""
    from ray import tune

    from sweep.trainable import TrialSetup, run_trial  # imports Ray

    folder = settings.sweep_dir
    resources = plan_on_ray(settings)
    echo(f"sweep '{settings.name}' in {folder}: {settings.trials} trials, {len(space.params)} searched "
         f"parameters ({', '.join(space.names)}); {resources.describe()}")
    # lesion masks only for the box head (box_loss_weight, fixed or searched): the data goes to every trial
    # through Ray's object store, and the masks add a third of the images' bytes
    boxes = base.box_loss_weight > 0 or "box_loss_weight" in space.keys
    with reading(folder / filenames.SPLITS, SPLITS_ADVICE):
        data = load_for_config(settings.data, base, splits_file=folder / filenames.SPLITS if resume else None,
                               masks=boxes)
    if settings.data is None:
        echo(f"notice: no --data given: using the built-in synthetic demo dataset ({data.root})")
    record = {"path": data.root, "fingerprint": data.fingerprint, "layout": data.layout}
    if not resume:
        save_settings(settings, space_text, base, record)
        write_splits(data, folder / filenames.SPLITS)
        if remote:
            remote.push_driver(folder)
    setup = TrialSetup(base=base.to_dict(), trials_dir=str(folder / filenames.TRIALS_DIR),
                       cpus=resources.cpus_per_trial, gpus=resources.gpus_per_trial,
                       storage=remote.store if remote else None, failed=_failed_for_good(folder) if resume else {})
    trainable = tune.with_resources(tune.with_parameters(run_trial, data=data, setup=setup), resources.per_trial)
    return SweepRun(settings, space, base, resources, trainable, echo, remote), record


def _failed_for_good(folder: Path) -> dict[str, str]:
    """Trials recorded as failed for a reason of their own (not a storage failure): trial id -> error."""
    from core.io.storage import storage_fault

    return {r["trial_id"]: r["error"] for r in read_trials(folder)
            if r.get("status") == "failed" and r.get("error") and not storage_fault(r["error"])}


def _search(sweep: SweepRun, resume: bool, warm: WarmStart | None) -> Any:
    """The search stage: Optuna suggests, ASHA stops; returns the trials table."""
    from sweep import searcher

    settings, recorder = sweep.settings, sweep.recorder("search")
    recorder.reconcile(_fit(sweep, EXPERIMENTS["search"], resume, lambda: _search_tuner(sweep, recorder, warm)))
    study = searcher.load_study(sweep.folder, settings.name)
    searcher.fail_orphans(study)
    set_field(sweep.folder, "optuna_trial", searcher.ray_trial_numbers(study))
    if sweep.remote:
        sweep.remote.push_records(sweep.folder)
    return recorder.write_table()


def _search_tuner(sweep: SweepRun, recorder: TrialRecorder, warm: WarmStart | None) -> Any:
    from sweep import searcher

    settings, space = sweep.settings, sweep.space
    sampler = searcher.make_sampler(settings.sampler, settings.seed, sweep.resources.slots, settings.trials,
                                    conditional=any(p.when for p in space.params))
    search = searcher.StudySearch(space.sample, metric=settings.metric, sampler=sampler,
                                  storage_url=searcher.storage_url(sweep.folder), study_name=settings.name,
                                  max_epochs=sweep.base.epochs, budget=settings.budget)
    if not search.study.trials:  # new: not when --resume restarts Ray's experiment on a study that has trials
        if warm is not None:
            search.study.add_trials(list(warm.trials))
            sweep.echo(warm.describe())
        for number, point in enumerate(space.start_points, 1):  # not again where a warm start has it
            search.study.enqueue_trial(dict(point), user_attrs={"start_point": number}, skip_if_exists=True)
    asha = settings.asha(space, sweep.base.epochs)
    if asha is not None:
        sweep.echo(asha.describe())
    if sweep.remote:  # the study in the bucket from the start: a resume elsewhere needs it
        sweep.remote.push_driver(sweep.folder)
    return _tuner(sweep, EXPERIMENTS["search"], search, asha.scheduler() if asha else None, settings.trials,
                  recorder)


def _confirm(sweep: SweepRun, runs: list[dict[str, Any]], resume: bool) -> Any:
    """The confirmation stage: the planned runs as Ray trials (all epochs, no early stopping)."""
    from sweep import confirm

    recorder = sweep.recorder("confirm")
    configs = len({r[confirm.CONFIRMS_KEY] for r in runs})
    sweep.echo(f"confirmation: {len(runs)} run(s) of the top {configs} config(s), "
               f"{sweep.settings.confirm_seeds} new seed(s) each")

    def new_tuner() -> Any:
        todo = confirm.still_to_run(runs, recorder.write_table())
        searcher = confirm.PlanSearcher(todo, sweep.settings.metric, sweep.settings.mode)
        return _tuner(sweep, EXPERIMENTS["confirm"], searcher, None, len(todo), recorder) if todo else None

    return recorder.reconcile(_fit(sweep, EXPERIMENTS["confirm"], resume, new_tuner))


def _fit(sweep: SweepRun, name: str, resume: bool, new_tuner: Callable[[], Any]) -> Any:
    """Run a stage's Ray Tune experiment: restored from ``<sweep>/<name>/`` on --resume where Ray can.

    ``new_tuner()`` returns None when there is nothing to run; the results are then empty."""
    from ray import tune

    from sweep.searcher import StudySearch, storage_url

    StudySearch.resumed_database = storage_url(sweep.folder)  # a restored searcher uses this driver's optuna.db
    experiment, where = str(sweep.folder / name), {}
    if sweep.remote:
        experiment, where = sweep.remote.store.path(name), {"storage_filesystem": sweep.remote.store.fs}
    if resume and tune.Tuner.can_restore(experiment, **where):
        sweep.echo(f"resuming from {sweep.remote.store.child(name).uri if sweep.remote else experiment}")
        # resume_errored: a trial that failed because the storage did goes on from its last checkpoint (in the
        # bucket; restart_errored would train it from scratch); one that failed for itself fails again at once
        # with its recorded error (TrialSetup.failed), so --resume never trains a broken config again.
        tuner = tune.Tuner.restore(experiment, trainable=sweep.trainable, resume_unfinished=True,
                                   resume_errored=True, **where)
    else:
        tuner = new_tuner()
    if tuner is None:
        return []
    with _signal_handlers_kept(), sweep.remote.noting_failure() if sweep.remote else contextlib.nullcontext():
        return tuner.fit()


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Put back the SIGINT and SIGUSR1 handlers after a Tune run. Why: Ray Tune's fit installs its own
    ("ending Ray Tune run") and leaves them behind; in a program that runs a sweep and then other work (a
    notebook, bench/), Ctrl+C would afterwards only log that warning instead of interrupting."""
    wanted = [s for s in (signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; Tune installs none elsewhere either
        return
    before = {s: signal.getsignal(s) for s in wanted}
    try:
        yield
    finally:
        for number, handler in before.items():
            if handler is not None:  # None: installed outside Python; cannot be put back by signal.signal
                signal.signal(number, handler)


def _tuner(sweep: SweepRun, name: str, search_alg: Searcher, scheduler: TrialScheduler | None, samples: int,
           recorder: TrialRecorder) -> tune.Tuner:
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    settings = sweep.settings
    where = sweep.remote.run_config() if sweep.remote else {"storage_path": str(sweep.folder)}
    return tune.Tuner(
        sweep.trainable,
        tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=samples,
                                    max_concurrent_trials=sweep.resources.slots, trial_dirname_creator=_trial_dirname,
                                    trial_name_creator=_trial_dirname, reuse_actors=True),
        run_config=tune.RunConfig(name=name, **where,
                                  callbacks=[recorder, JsonLoggerCallback()],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1))


def _trial_dirname(trial: Trial) -> str:
    return trial.trial_id


def _records(folder: Path) -> dict[str, dict[str, Any]]:
    return {r["trial_id"]: r for r in read_trials(folder)}


def _finish(sweep: SweepRun, frame: pd.DataFrame, runs: list[dict[str, Any]], data: dict[str, str],
            started: float) -> SweepResult:
    """Rank, write best.json and the summary."""
    from sweep import confirm, searcher
    from sweep.choose_best import choose_and_write

    settings, folder = sweep.settings, sweep.folder
    configs = confirm.ranked(frame, runs, settings.metric, settings.mode) if runs else []
    configs = [c for c in configs if c.runs]
    study = searcher.load_study(folder, settings.name)
    best = choose_and_write(settings, frame, configs, sweep.base, data)
    ensemble = _ensemble(sweep, frame) if best is not None else None
    summary = summary_text(settings, _shown(folder), frame, best, sweep.space.names, time.time() - started,
                           [confirm.summary_lines(configs, settings.metric, settings.confirm_seeds),
                            ensemble_summary(ensemble) if ensemble else [], _study_lines(study)])
    atomic.write_text(folder / filenames.SUMMARY, summary + "\n")
    refresh_sweep_page(folder)  # report.html; never fails the sweep (a warning instead)
    if sweep.remote:
        sweep.remote.push_records(folder)
    sweep.echo(summary)
    return SweepResult(sweep_dir=folder, best=best, summary=summary, trials=frame)


def _ensemble(sweep: SweepRun, frame: pd.DataFrame) -> dict[str, Any] | None:
    """ensemble.json: the greedy ensemble of the full-length runs (sweep/ensemble.py); None when off."""
    from sweep.ensemble import choose_ensemble

    settings = sweep.settings
    return choose_ensemble(sweep.folder, frame, settings.metric, settings.mode, sweep.base.epochs,
                           settings.ensemble_size, sweep.echo)


def _study_lines(study: optuna.Study) -> list[str]:
    from sweep import searcher

    counts = searcher.state_counts(study)
    warm = sum(1 for t in study.get_trials(deepcopy=False) if "warm_start_from" in t.user_attrs)
    lines = ["optuna.db: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
             + (f" ({warm} of them warm-started from an earlier sweep)" if warm else "")
             + "; COMPLETE: ran every epoch, PRUNED: stopped early by ASHA"]
    found = searcher.importances(study)
    if found:
        values, complete = found
        lines.append(f"parameter importances (Optuna, from the {complete} COMPLETE trials): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    return lines


def _shown(folder: Path) -> Path:
    try:
        return folder.relative_to(Path.cwd())
    except ValueError:
        return folder


# --- command line ----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sweep.run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search training hyperparameters with Ray Tune + Optuna (seeded TPE), with ASHA early "
                    "stopping, across the GPUs (or CPUs) of this machine or a Ray cluster; then train the best "
                    "configs again with new seeds and hand on the one with the best mean.",
        epilog="outputs in RESULTS/NAME/: report.html (the page to open), best.json (for python -m "
               "core.final_train), trials.csv, optuna.db, TensorBoard runs, summary.txt\nsearch-space schema: search_spaces/README.md\n\n"
               "config keys (--set key=value):\n" + TrainConfig.describe())
    add_options(p)
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or ray://host:port (every node needs "
                                     "this project and its environment at the same path); without it the "
                                     "sweep starts its own Ray on this machine")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep with its saved settings (finished trials are kept; an "
                        "interrupted confirmation stage goes on; a trial that failed because the storage did "
                        "goes on from its last checkpoint, one that failed for itself stays failed)")
    return p


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    given = {k: getattr(args, k) for k in SEARCH_OPTIONS if getattr(args, k) is not None}
    if "overrides" in given:
        given["overrides"] = tuple(given["overrides"])
    space = given.get("space", DEFAULT_SPACE)
    name = args.name or f"{Path(space).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"--name {name!r}: must be a plain folder name")
    return SweepSettings(name=name, results=str(Path(args.results).resolve()), storage=args.storage,
                         storage_endpoint=args.storage_endpoint, **given)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.resume:
        given = [k for k in SEARCH_OPTIONS if getattr(args, k) is not None]
        if given:
            raise UserError(f"--resume continues a sweep with its saved settings: drop {flag(given[0])}")
        results = Path(args.results).resolve()
        if args.storage:
            from sweep.storage import fetch_settings

            name = fetch_settings(args.storage, args.storage_endpoint, args.name, results)
        else:
            name = args.name or latest_sweep(results)
        saved = load_settings(results / name)  # a sweep kept in a bucket stays there unless --storage moves it
        settings = dataclasses.replace(saved, results=str(results), storage=args.storage or saved.storage,
                                       storage_endpoint=args.storage_endpoint or saved.storage_endpoint)
    else:
        settings = settings_from_args(args)
    report = run_sweep(settings, resume=args.resume, address=args.address)
    return 0 if report.best is not None else 1


if __name__ == "__main__":
    run_cli(main)
