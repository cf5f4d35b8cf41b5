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
from typing import Any, Callable, Iterator, Sequence

from core import atomic
from core.best_file import SPLITS_ADVICE
from core.config import SELECT_METRICS, TrainConfig
from core.errors import UserError, run_cli
from core.state_files import check_newest, check_output_dir, check_sqlite, reading
from sweep.outputs import EXPERIMENTS
from sweep.settings import (DEFAULT_SPACE, SEARCH_OPTIONS, SETTINGS_FILE, SPACE_COPY, SweepSettings, base_config,
                            latest_sweep, load_settings, read_text)
from sweep.space import SearchSpace, parse_space

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
Echo = Callable[[str], None]
# Ray Tune's experiment state in ray/ and ray-confirm/ (the newest of each, by name), checked before --resume
# restores it; search_gen_state-*.json is a pickle despite its name.
RAY_STATE = {"json_files": ("experiment_state-*.json",),
             "pickles": ("search_gen_state-*.json", "searcher-state-*.pkl", "tuner.pkl")}


@dataclass(frozen=True)
class SweepReport:
    sweep_dir: Path
    best: dict[str, Any] | None
    summary: str
    trials: Any                       # the trials table (pandas DataFrame)


@dataclass(frozen=True)
class Sweep:
    """What the stages of one sweep share."""

    settings: SweepSettings
    space: SearchSpace
    base: TrainConfig
    resources: Any                    # sweep.resources.Resources
    trainable: Any                    # the Ray Tune trainable, data and resources attached
    echo: Echo
    remote: Any = None                # sweep.storage.SweepStorage with --storage, else None

    @property
    def folder(self) -> Path:
        return self.settings.sweep_dir

    def recorder(self, role: str) -> Any:
        from sweep.recorder import TrialRecorder

        return TrialRecorder(self.folder, self.space.names, self.settings.metric, self.settings.mode,
                             self.base.epochs, self.base.seed, role=role, remote=self.remote)


def run_sweep(settings: SweepSettings, *, resume: bool = False, address: str | None = None,
              echo: Echo = print) -> SweepReport:
    """Run (or, with ``resume``, continue) a sweep; Ray is started here unless it already runs."""
    started = time.time()
    settings.check()
    folder = check_output_dir(settings.sweep_dir, "--results/--name")
    remote = _remote(settings, resume)
    if resume:
        _check_state(folder)
    space, space_text = _space(settings, resume)
    base = base_config(space, settings)
    missing = [m for m in ("ray", "optuna") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the sweep needs {' and '.join(missing)}, not installed in {sys.prefix}: "
                        f"pip install -c constraints.txt -e .")
    warm = None if resume or not settings.warm_start else _warm_start(settings, space, base)

    import ray

    from sweep.resources import connect_ray

    connected = connect_ray(settings, address, echo)
    try:
        return _run(settings, space, space_text, base, resume, warm, started, echo, remote)
    finally:
        if connected:
            ray.shutdown()


def _remote(settings: SweepSettings, resume: bool) -> Any:
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


def _check_state(folder: Path) -> None:
    """Before --resume: damaged optuna.db or Ray state is a one-line error (Ray would log a traceback and start
    the sweep over, trials run again); a killed driver's temp files go."""
    if (folder / "optuna.db").exists():
        check_sqlite(folder / "optuna.db", "start a new sweep with another --name", tables=("studies", "trials"))
    for experiment in EXPERIMENTS.values():
        check_newest(folder / experiment, "the sweep cannot be continued: start a new one with another --name",
                     **RAY_STATE)
    atomic.remove_stale_temps(folder, ("*", "trials/*/*"))


def _space(settings: SweepSettings, resume: bool) -> tuple[SearchSpace, str]:
    folder = settings.sweep_dir
    if resume:
        text = read_text(folder / SPACE_COPY)
        return parse_space(text, source=str(folder / SPACE_COPY)), text
    if (folder / SETTINGS_FILE).exists():
        raise UserError(f"{folder} already holds a sweep: --resume continues it, or choose another --name")
    text = read_text(Path(settings.space))
    return parse_space(text, source=settings.space), text


def _warm_start(settings: SweepSettings, space: SearchSpace, base: TrainConfig) -> Any:
    from sweep.warm_start import load_warm_start

    return load_warm_start(settings.warm_start, space, base.to_dict(), settings.metric, settings.data)


def _run(settings: SweepSettings, space: SearchSpace, space_text: str, base: TrainConfig, resume: bool,
         warm: Any, started: float, echo: Echo, remote: Any = None) -> SweepReport:
    """The two stages, each skipped where an interrupted sweep had finished it."""
    from sweep import confirm

    sweep, data = _prepare(settings, space, space_text, base, resume, echo, remote)
    runs = confirm.read_plan(sweep.folder) if resume else None
    if runs is None:  # the search has not finished (confirm.json marks its end)
        frame = _search(sweep, resume, warm)
        runs = confirm.plan(frame, settings.metric, settings.confirm_top, settings.confirm_seeds, base.seed,
                            {t: r["params"] for t, r in _records(sweep.folder).items()})
        confirm.write_plan(sweep.folder, runs, settings.confirm_top, settings.confirm_seeds)
        if remote:
            remote.push_records(sweep.folder)
    frame = _confirm(sweep, runs, resume) if runs else sweep.recorder("search").write_table()
    return _finish(sweep, frame, runs, data, started)


def _prepare(settings: SweepSettings, space: SearchSpace, space_text: str, base: TrainConfig, resume: bool,
             echo: Echo, remote: Any) -> tuple[Sweep, dict[str, str]]:
    """Plan the resources, load the data (once, for every trial), save the settings and split; the trainable."""
    from ray import tune

    from core import filenames
    from core.data import load_for_config
    from core.splits import write_splits
    from sweep.resources import plan_on_ray
    from sweep.settings import save_settings
    from sweep.trainable import TrialSetup, run_trial

    folder = settings.sweep_dir
    resources = plan_on_ray(settings)
    echo(f"sweep '{settings.name}' in {folder}: {settings.trials} trials, {len(space.params)} searched "
         f"parameters ({', '.join(space.names)}); {resources.describe()}")
    # no lesion masks: trials only train, and the data goes to every trial through Ray's object store
    with reading(folder / filenames.SPLITS, SPLITS_ADVICE):
        data = load_for_config(settings.data, base, splits_file=folder / filenames.SPLITS if resume else None,
                               masks=False)
    if settings.data is None:
        echo(f"notice: no --data given: using the built-in synthetic demo dataset ({data.root})")
    record = {"path": data.root, "fingerprint": data.fingerprint, "layout": data.layout}
    if not resume:
        save_settings(settings, space_text, base, record)
        write_splits(data, folder / filenames.SPLITS)
        if remote:
            remote.push_driver(folder)
    setup = TrialSetup(base=base.to_dict(), trials_dir=str(folder / "trials"), cpus=resources.cpus_per_trial,
                       gpus=resources.gpus_per_trial, storage=remote.store if remote else None)
    trainable = tune.with_resources(tune.with_parameters(run_trial, data=data, setup=setup), resources.per_trial)
    return Sweep(settings, space, base, resources, trainable, echo, remote), record


def _search(sweep: Sweep, resume: bool, warm: Any) -> Any:
    """The search stage: Optuna suggests, ASHA stops; returns the trials table."""
    from sweep import searcher
    from sweep.outputs import set_field

    settings, recorder = sweep.settings, sweep.recorder("search")
    recorder.reconcile(_fit(sweep, EXPERIMENTS["search"], resume, lambda: _search_tuner(sweep, recorder, warm)))
    study = searcher.load_study(sweep.folder, settings.name)
    searcher.fail_orphans(study)
    set_field(sweep.folder, "optuna_trial", searcher.ray_trial_numbers(study))
    if sweep.remote:
        sweep.remote.push_records(sweep.folder)
    return recorder.write_table()


def _search_tuner(sweep: Sweep, recorder: Any, warm: Any) -> Any:
    from sweep import searcher

    settings, space = sweep.settings, sweep.space
    sampler = searcher.make_sampler(settings.sampler, settings.seed, sweep.resources.slots, settings.trials,
                                    conditional=any(p.when for p in space.params))
    search = searcher.StudySearch(space.sample, metric=settings.metric, mode=settings.mode, sampler=sampler,
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


def _confirm(sweep: Sweep, runs: list[dict[str, Any]], resume: bool) -> Any:
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


def _fit(sweep: Sweep, name: str, resume: bool, new_tuner: Callable[[], Any]) -> Any:
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
        tuner = tune.Tuner.restore(experiment, trainable=sweep.trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False, **where)
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


def _tuner(sweep: Sweep, name: str, search_alg: Any, scheduler: Any, samples: int, recorder: Any) -> Any:
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


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _records(folder: Path) -> dict[str, dict[str, Any]]:
    from sweep.outputs import read_trials

    return {r["trial_id"]: r for r in read_trials(folder)}


def _finish(sweep: Sweep, frame: Any, runs: list[dict[str, Any]], data: dict[str, str],
            started: float) -> SweepReport:
    """Rank, write best.json and the summary."""
    from sweep import confirm, searcher
    from sweep.best_file import choose_and_write
    from sweep.outputs import summary_text
    from sweep.report import write_sweep_report

    settings, folder = sweep.settings, sweep.folder
    configs = confirm.ranked(frame, runs, settings.metric, settings.mode) if runs else []
    configs = [c for c in configs if c.runs]
    study = searcher.load_study(folder, settings.name)
    best = choose_and_write(folder, frame, configs, metric=settings.metric, mode=settings.mode, base=sweep.base,
                            data=data, sweep={"name": settings.name, "space": str(settings.space),
                                              "trials": settings.trials, "scheduler": settings.scheduler,
                                              "sampler": settings.sampler, "seed": settings.seed})
    summary = summary_text(name=settings.name, sweep_dir=_shown(folder), frame=frame, best=best,
                           metric=settings.metric, param_names=sweep.space.names, wall_s=time.time() - started,
                           trials_wanted=settings.trials,
                           confirmation=confirm.summary_lines(configs, settings.metric, settings.confirm_seeds),
                           study=_study_lines(study))
    atomic.write_text(folder / "summary.txt", summary + "\n")
    write_sweep_report(folder)  # report.html; never fails the sweep (a warning instead)
    if sweep.remote:
        sweep.remote.push_records(folder)
    sweep.echo(summary)
    return SweepReport(sweep_dir=folder, best=best, summary=summary, trials=frame)


def _study_lines(study: Any) -> list[str]:
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
    p.add_argument("--gpus", type=int, help="GPUs to use (default: all visible; 0 trains on the CPU)")
    p.add_argument("--gpus-per-trial", type=float, metavar="F",
                   help="GPUs per trial; fractions share a GPU (0.25: four trials per GPU) (default 1)")
    p.add_argument("--cpus-per-trial", type=int, metavar="N",
                   help="CPUs (torch threads) per trial (default: the CPUs shared evenly among the trials that "
                        "run at once)")
    p.add_argument("--trials", type=int, help="number of search trials (default 20)")
    p.add_argument("--budget", type=int, metavar="N",
                   help="trial-epochs the search may spend: no new trial starts once the trials have run N "
                        "epochs in all (running ones finish); --trials stays the most trials (default: no limit)")
    p.add_argument("--space", metavar="FILE", help=f"search-space file (default {DEFAULT_SPACE})")
    p.add_argument("--data", metavar="PATH", help="dataset folder (HAM10000, ISIC 2018 or ImageFolder layout; "
                                                  "default: the built-in synthetic demo dataset)")
    p.add_argument("--metric", choices=SELECT_METRICS,
                   help="validation metric to optimise (default val_balanced_accuracy; maximised, a loss "
                        "is minimised)")
    p.add_argument("--max-epochs", type=int, metavar="N", help="epochs per trial (default: the config's epochs)")
    p.add_argument("--scheduler", choices=("asha", "none"), help="early stopping of poor trials (default asha)")
    p.add_argument("--grace-period", type=int, metavar="N", help="ASHA: epochs before a trial can be stopped "
                                                                 "(default: the space's asha:, else 2)")
    p.add_argument("--reduction-factor", type=float, metavar="F",
                   help="ASHA: keep 1/F of trials at each rung (default: the space's asha:, else 3)")
    p.add_argument("--sampler", choices=("tpe", "random"), help="Optuna sampler (default tpe; random: a baseline)")
    p.add_argument("--confirm-top", type=int, metavar="K",
                   help="after the search, train the K best configs again with new seeds (default 3; 0: off)")
    p.add_argument("--confirm-seeds", type=int, metavar="S", help="new seeds per confirmed config (default 2)")
    p.add_argument("--warm-start", metavar="SWEEP_DIR",
                   help="add the finished trials of an earlier sweep (same data, metric and fixed config; same "
                        "searched keys) to the study before the first suggestion")
    p.add_argument("--name", help="sweep name (default: <space>-<date>-<time>); with --resume: the sweep to "
                                  "continue (default: the latest)")
    p.add_argument("--results", metavar="DIR", default="results", help="results folder (default results/)")
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or ray://host:port (every node needs "
                                     "this project and its environment at the same path); without it the "
                                     "sweep starts its own Ray on this machine")
    p.add_argument("--storage", metavar="s3://BUCKET/PREFIX",
                   help="keep the sweep in object storage too, in PREFIX/NAME/: Ray's state, every trial's files "
                        "and the outputs (for a cluster without a shared file system; credentials from "
                        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); with --resume: continue the sweep found there")
    p.add_argument("--storage-endpoint", metavar="URL",
                   help="URL of an S3-compatible server (SeaweedFS, MinIO, Ceph), e.g. http://127.0.0.1:8333 "
                        "(default: AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep with its saved settings (finished trials are kept; an "
                        "interrupted confirmation stage goes on)")
    p.add_argument("--seed", type=int, help="seed of the Optuna sampler (default 0)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="fix a config key for every trial; repeatable")
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
            raise UserError(f"--resume continues a sweep with its saved settings: drop --{given[0].replace('_', '-')}"
                            .replace("--overrides", "--set"))
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
