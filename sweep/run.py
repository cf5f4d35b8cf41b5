"""Hyperparameter sweep: core/'s training run as a Ray Tune trainable, searched by Optuna (seeded TPE).

    python -m sweep.run --gpus 4 --trials 40 --data ../shared/data/ham10000-200x150
    python -m sweep.run --gpus 1 --gpus-per-trial 0.25 --trials 40 --data DATA    # 4 trials per GPU
    python -m sweep.run --gpus 0 --space search_spaces/quick.yaml --trials 4      # CPU only
    python -m sweep.run --resume --name NAME                                       # after a crash
    python -m sweep.run --address auto ...                                         # a running Ray cluster

Outputs go to ``results/<name>/`` (see sweep/outputs.py): best.json for
``python -m core.final_train results/<name>/best.json``, trials.csv, the Optuna study (optuna.db),
TensorBoard runs (``tensorboard --logdir results/<name>``) and a summary printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from core import atomic
from core.best_file import SPLITS_ADVICE
from core.config import SELECT_METRICS, TrainConfig
from core.errors import UserError, run_cli
from core.state_files import check_newest, check_output_dir, check_sqlite, reading
from sweep.space import SearchSpace, parse_space

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = "search_spaces/default.yaml"
SETTINGS_FILE = "sweep.json"
SETTINGS_FORMAT = "lesion-sweep/sweep"
SPACE_COPY = "space.yaml"
# Ray Tune's experiment state in ray/ (the newest of each, by name), checked before --resume restores it;
# search_gen_state-*.json is a pickle despite its name.
RAY_STATE = {"json_files": ("experiment_state-*.json",),
             "pickles": ("search_gen_state-*.json", "searcher-state-*.pkl", "tuner.pkl")}
# Options that define what a sweep searches; --resume keeps the saved ones.
SEARCH_OPTIONS = ("space", "data", "metric", "max_epochs", "scheduler", "grace_period", "reduction_factor", "trials",
                  "seed", "overrides", "gpus", "gpus_per_trial", "cpus_per_trial")


@dataclass(frozen=True)
class SweepSettings:
    """Everything a sweep depends on (saved as sweep.json; --resume reads it back)."""

    name: str
    results: str                      # the results folder (the sweep lives in results/<name>/)
    space: str = DEFAULT_SPACE
    data: str | None = None           # None: the built-in demo dataset
    metric: str = "val_balanced_accuracy"
    max_epochs: int | None = None     # None: the config's epochs
    scheduler: str = "asha"
    grace_period: int = 2
    reduction_factor: float = 3.0
    trials: int = 20
    seed: int = 0
    overrides: tuple[str, ...] = ()
    gpus: int | None = None           # None: all visible
    gpus_per_trial: float | None = None
    cpus_per_trial: int | None = None

    @property
    def mode(self) -> str:
        return "min" if self.metric.endswith("loss") else "max"

    @property
    def sweep_dir(self) -> Path:
        return Path(self.results).resolve() / self.name


@dataclass(frozen=True)
class Resources:
    """How the sweep shares the machine (or cluster) out."""

    cpus: int
    gpus: int
    cpus_per_trial: int
    gpus_per_trial: float
    slots: int                        # trials that run at once

    def describe(self) -> str:
        if self.gpus:
            return (f"{self.slots} trial(s) at once on {self.gpus} GPU(s): {self.gpus_per_trial:g} GPU and "
                    f"{self.cpus_per_trial} CPU(s) per trial")
        return f"{self.slots} trial(s) at once on {self.cpus} CPU(s), {self.cpus_per_trial} per trial, no GPU"


@dataclass(frozen=True)
class SweepReport:
    sweep_dir: Path
    best: dict[str, Any] | None
    summary: str
    trials: Any                       # the trials table (pandas DataFrame)


# --- settings and configuration ------------------------------------------------------------------------
def base_config(space: SearchSpace, settings: SweepSettings) -> TrainConfig:
    """The fixed part of every trial's config: defaults, then the space's base, then --set, then --max-epochs."""
    if settings.metric not in SELECT_METRICS:
        raise UserError(f"--metric {settings.metric!r}: expected one of {', '.join(SELECT_METRICS)}")
    cfg = TrainConfig.from_dict(space.base)
    cfg = cfg.with_overrides(settings.overrides)
    searched = [o.partition("=")[0].strip() for o in settings.overrides if o.partition("=")[0].strip() in space.names]
    if searched:
        raise UserError(f"--set {searched[0]}=...: '{searched[0]}' is searched by {space.source}; "
                        f"drop it from --set or from the space")
    fixed = {"select_metric": settings.metric}  # each trial's best.pt is its best epoch by the sweep's metric
    if settings.max_epochs is not None:
        if any(o.partition("=")[0].strip() == "epochs" for o in settings.overrides) \
                and cfg.epochs != settings.max_epochs:
            raise UserError(f"--max-epochs {settings.max_epochs} and --set epochs={cfg.epochs} disagree; give one")
        fixed["epochs"] = settings.max_epochs
    cfg = TrainConfig.from_dict(fixed, base=cfg)
    space.check_against(cfg)
    return cfg


def plan_resources(settings: SweepSettings, cpus: int, gpus_available: int, where: str) -> Resources:
    """GPUs and CPUs per trial and how many trials run at once; impossible requests fail here."""
    gpus = gpus_available if settings.gpus is None else settings.gpus
    if gpus < 0:
        raise UserError(f"--gpus {gpus}: must be 0 or more")
    if gpus > gpus_available:
        raise UserError(f"--gpus {gpus}: {where} has {gpus_available} GPU(s)"
                        + (" (use --gpus 0 to train on the CPU)" if gpus_available == 0 else ""))
    if gpus == 0:
        if settings.gpus_per_trial:
            raise UserError(f"--gpus-per-trial {settings.gpus_per_trial:g} needs GPUs, but the sweep uses none "
                            f"(--gpus 0 or no GPU on {where})")
        cpt = settings.cpus_per_trial or max(1, cpus // max(1, min(settings.trials, cpus)))
        if not 1 <= cpt <= cpus:
            raise UserError(f"--cpus-per-trial {cpt}: must be between 1 and the {cpus} CPU(s) of {where}")
        return Resources(cpus=cpus, gpus=0, cpus_per_trial=cpt, gpus_per_trial=0.0, slots=cpus // cpt)
    gpt = 1.0 if settings.gpus_per_trial is None else float(settings.gpus_per_trial)
    if not 0 < gpt <= gpus or gpt > 1 and not gpt.is_integer():
        raise UserError(f"--gpus-per-trial {gpt:g}: must be a fraction in (0, 1] or a whole number up to "
                        f"--gpus {gpus}")
    gpu_slots = math.floor(gpus / gpt + 1e-9)
    cpt = settings.cpus_per_trial or max(1, cpus // gpu_slots)
    if not 1 <= cpt <= cpus:
        raise UserError(f"--cpus-per-trial {cpt}: must be between 1 and the {cpus} CPU(s) of {where}")
    return Resources(cpus=cpus, gpus=gpus, cpus_per_trial=cpt, gpus_per_trial=gpt,
                     slots=max(1, min(gpu_slots, cpus // cpt)))


def save_settings(settings: SweepSettings, space_text: str, base: TrainConfig) -> None:
    folder = settings.sweep_dir
    atomic.write_text(folder / SPACE_COPY, space_text)
    atomic.write_json(folder / SETTINGS_FILE, {
        "format": SETTINGS_FORMAT, "version": 1, "settings": dataclasses.asdict(settings),
        "base_config": base.to_dict(), "created": datetime.now().isoformat(timespec="seconds")})


def load_settings(folder: Path) -> SweepSettings:
    with reading(folder / SETTINGS_FILE, "start a new sweep with another --name", KeyError, TypeError, ValueError):
        return _load_settings(folder)


def _load_settings(folder: Path) -> SweepSettings:
    doc = atomic.read_json_object(folder / SETTINGS_FILE, "no sweep to resume here")
    if doc.get("format") != SETTINGS_FORMAT:
        raise UserError(f"{folder / SETTINGS_FILE}: not a sweep settings file")
    values = dict(doc["settings"])
    values["overrides"] = tuple(values.get("overrides") or ())
    return SweepSettings(**values)


def latest_sweep(results: Path) -> str:
    candidates = sorted(results.glob(f"*/{SETTINGS_FILE}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"--resume: no sweep in {results}/ to resume; give --name")
    return candidates[-1].parent.name


# --- the sweep -------------------------------------------------------------------------------------------
def run_sweep(settings: SweepSettings, *, resume: bool = False, address: str | None = None,
              echo: Any = print) -> SweepReport:
    """Run (or, with ``resume``, continue) a sweep; Ray is started here unless it already runs."""
    started = time.time()
    folder = check_output_dir(settings.sweep_dir, "--results/--name")
    if resume and (folder / "optuna.db").exists():
        check_sqlite(folder / "optuna.db", "start a new sweep with another --name", tables=("studies", "trials"))
    if resume:  # Ray would log a damaged state's traceback and start the sweep over, trials run again
        check_newest(folder / "ray", "the sweep cannot be continued: start a new one with another --name", **RAY_STATE)
        atomic.remove_stale_temps(folder, ("*", "trials/*/*"))  # what a killed driver was writing
    if resume:
        space_text = _read_text(folder / SPACE_COPY)
        space = parse_space(space_text, source=str(folder / SPACE_COPY))
    else:
        if (folder / SETTINGS_FILE).exists():
            raise UserError(f"{folder} already holds a sweep: --resume continues it, or choose another --name")
        space_text = _read_text(Path(settings.space))
        space = parse_space(space_text, source=settings.space)
    base = base_config(space, settings)
    if settings.trials < 1:
        raise UserError(f"--trials {settings.trials}: must be at least 1")
    if settings.scheduler not in ("asha", "none"):
        raise UserError(f"--scheduler {settings.scheduler!r}: expected 'asha' or 'none'")
    if settings.scheduler == "asha" and not (1 <= settings.grace_period and settings.reduction_factor > 1):
        raise UserError("--grace-period must be at least 1 and --reduction-factor above 1")
    missing = [m for m in ("ray", "optuna") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the sweep needs {' and '.join(missing)}, not installed in {sys.prefix}: "
                        f"pip install -c constraints.txt -e .")

    import ray

    started_ray = _connect_ray(settings, address)
    try:
        return _run(settings, space, space_text, base, resume, started, echo, ray)
    finally:
        if started_ray:
            ray.shutdown()


def _run(settings: SweepSettings, space: SearchSpace, space_text: str, base: TrainConfig, resume: bool,
         started: float, echo: Any, ray: Any) -> SweepReport:
    from ray import tune

    from core.data import load_for_config, write_splits
    from sweep.recorder import TrialRecorder
    from sweep.trainable import TrialSetup, run_trial

    folder = settings.sweep_dir
    cluster = ray.cluster_resources()
    where = "this machine" if len(ray.nodes()) <= 1 else "the Ray cluster"
    resources = plan_resources(settings, int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0)), where)
    echo(f"sweep '{settings.name}' in {folder}: {settings.trials} trials, {len(space.params)} searched "
         f"parameters ({', '.join(space.names)}); {resources.describe()}")

    splits_file = folder / "splits.csv"
    with reading(splits_file, SPLITS_ADVICE):
        data = load_for_config(settings.data, base, splits_file=splits_file if resume else None)
    if settings.data is None:
        echo(f"notice: no --data given: using the built-in synthetic demo dataset ({data.root})")
    if not resume:
        save_settings(settings, space_text, base)
        write_splits(data, splits_file)

    setup = TrialSetup(base=base.to_dict(), trials_dir=str(folder / "trials"), cpus=resources.cpus_per_trial,
                       gpus=resources.gpus_per_trial)
    trainable = tune.with_resources(tune.with_parameters(run_trial, data=data, setup=setup),
                                    {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial})
    recorder = TrialRecorder(folder, space.names, settings.metric, settings.mode, base.epochs)
    experiment = folder / "ray"
    if resume and tune.Tuner.can_restore(str(experiment)):
        echo(f"resuming from {experiment}")
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = _new_tuner(settings, space, base, resources, trainable, recorder)
    results = tuner.fit()

    frame = recorder.reconcile(results)
    study = _study(settings)
    _fail_orphans(study)
    best = _write_best(settings, frame, data, base)
    importances = _importances(study)
    summary = _summary(settings, folder, frame, best, space, importances, time.time() - started)
    atomic.write_text(folder / "summary.txt", summary + "\n")
    echo(summary)
    return SweepReport(sweep_dir=folder, best=best, summary=summary, trials=frame)


def _new_tuner(settings: SweepSettings, space: SearchSpace, base: TrainConfig, resources: Resources,
               trainable: Any, recorder: Any) -> Any:
    import optuna
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=space.sample, metric=settings.metric, mode=settings.mode,
                            sampler=optuna.samplers.TPESampler(seed=settings.seed),
                            storage=optuna.storages.RDBStorage(_storage_url(settings)), study_name=settings.name)
    scheduler = None
    if settings.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=base.epochs,
                                  grace_period=min(settings.grace_period, base.epochs),
                                  reduction_factor=settings.reduction_factor)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=settings.trials,
                                    max_concurrent_trials=resources.slots, trial_dirname_creator=_trial_dirname,
                                    trial_name_creator=_trial_dirname, reuse_actors=True),
        run_config=tune.RunConfig(name="ray", storage_path=str(settings.sweep_dir),
                                  callbacks=[recorder, JsonLoggerCallback()],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1))


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _connect_ray(settings: SweepSettings, address: str | None) -> bool:
    """Start Ray for this machine, or join ``address``; returns whether this call started it."""
    import ray

    # Tune's own TensorBoard logger would duplicate core.train's curves in the logdir (JSON is added back).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Every checkpoint forces an experiment snapshot (num_to_keep=1): wanted, for --resume; not worth a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    # Trial processes import core/ and sweep/ from this checkout (the project need not be installed).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"--address {address}: cannot join the Ray cluster ({exc})") from None
        return True
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    resources = plan_resources(settings, cpus, _local_gpus(), "this machine")  # fails before starting anything
    ray.init(num_cpus=cpus, num_gpus=resources.gpus, include_dashboard=False, log_to_driver=True)
    return True


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _storage_url(settings: SweepSettings) -> str:
    return f"sqlite:///{settings.sweep_dir / 'optuna.db'}"


def _study(settings: SweepSettings) -> Any:
    import optuna

    return optuna.load_study(study_name=settings.name, storage=_storage_url(settings))


def _fail_orphans(study: Any) -> None:
    """Optuna trials left RUNNING by a killed driver: Ray never ran them to the end; mark them failed."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        log.info("optuna trial %d was left running by an interrupted driver: marked failed", trial.number)


def _write_best(settings: SweepSettings, frame: Any, data: Any, base: TrainConfig) -> dict[str, Any] | None:
    from sweep.best_file import build_best, write_best
    from sweep.outputs import read_trial

    final = f"{settings.metric}_final"
    ranked = frame[frame[final].notna() & (frame["status"] != "failed")]
    if ranked.empty:
        return None
    trial_id = ranked.iloc[0]["trial_id"]
    record = read_trial(settings.sweep_dir, trial_id)
    params = record["params"]
    config = TrainConfig.from_dict(params, base=base)  # as the trial built it (sweep/trainable.py)
    checkpoint = Path("trials") / trial_id / "best.pt"
    best = build_best(
        config=config.to_dict(), metric=settings.metric, value=float(ranked.iloc[0][final]), mode=settings.mode,
        trial_id=trial_id, data={"path": data.root, "fingerprint": data.fingerprint, "layout": data.layout},
        splits_file="splits.csv",
        checkpoint=str(checkpoint) if (settings.sweep_dir / checkpoint).is_file() else None, params=params,
        sweep={"name": settings.name, "space": str(settings.space), "trials": settings.trials,
               "scheduler": settings.scheduler, "seed": settings.seed,
               "best_epoch_value": _maybe_float(ranked.iloc[0][f"{settings.metric}_best"])})
    write_best(settings.sweep_dir / "best.json", best)
    return best


def _maybe_float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _importances(study: Any) -> dict[str, float] | None:
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 3:
        return None
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as exc:  # e.g. no parameter common to all complete trials
        log.info("parameter importances not computed: %s", exc)
        return None


def _summary(settings: SweepSettings, folder: Path, frame: Any, best: dict[str, Any] | None, space: SearchSpace,
             importances: dict[str, float] | None, wall_s: float) -> str:
    from sweep.outputs import summary_text

    shown = folder
    try:
        shown = folder.relative_to(Path.cwd())
    except ValueError:
        pass
    return summary_text(name=settings.name, sweep_dir=shown, frame=frame, best=best, metric=settings.metric,
                        param_names=space.names, importances=importances, wall_s=wall_s,
                        trials_wanted=settings.trials)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None


# --- command line ----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sweep.run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search training hyperparameters with Ray Tune + Optuna (seeded TPE), with ASHA early "
                    "stopping, across the GPUs (or CPUs) of this machine or a Ray cluster.",
        epilog="outputs in RESULTS/NAME/: best.json (for python -m core.final_train), trials.csv, optuna.db, "
               "TensorBoard runs, summary.txt\nsearch-space schema: search_spaces/README.md\n\n"
               "config keys (--set key=value):\n" + TrainConfig.describe())
    p.add_argument("--gpus", type=int, help="GPUs to use (default: all visible; 0 trains on the CPU)")
    p.add_argument("--gpus-per-trial", type=float, metavar="F",
                   help="GPUs per trial; fractions share a GPU (0.25: four trials per GPU) (default 1)")
    p.add_argument("--cpus-per-trial", type=int, metavar="N",
                   help="CPUs (torch threads) per trial (default: the CPUs shared evenly among the trials that "
                        "run at once)")
    p.add_argument("--trials", type=int, help="number of trials (default 20)")
    p.add_argument("--space", metavar="FILE", help=f"search-space file (default {DEFAULT_SPACE})")
    p.add_argument("--data", metavar="PATH", help="dataset folder (HAM10000, ISIC 2018 or ImageFolder layout; "
                                                  "default: the built-in synthetic demo dataset)")
    p.add_argument("--metric", choices=SELECT_METRICS,
                   help="validation metric to optimise (default val_balanced_accuracy; maximised, a loss "
                        "is minimised)")
    p.add_argument("--max-epochs", type=int, metavar="N", help="epochs per trial (default: the config's epochs)")
    p.add_argument("--scheduler", choices=("asha", "none"), help="early stopping of poor trials (default asha)")
    p.add_argument("--grace-period", type=int, metavar="N", help="ASHA: epochs before a trial can be stopped "
                                                                 "(default 2)")
    p.add_argument("--reduction-factor", type=float, metavar="F", help="ASHA: keep 1/F of trials at each rung "
                                                                       "(default 3)")
    p.add_argument("--name", help="sweep name (default: <space>-<date>-<time>); with --resume: the sweep to "
                                  "continue (default: the latest)")
    p.add_argument("--results", metavar="DIR", default="results", help="results folder (default results/)")
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or ray://host:port (every node needs "
                                     "this project and its environment at the same path)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep with its saved settings (finished trials are kept)")
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
    return SweepSettings(name=name, results=str(Path(args.results).resolve()), **given)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.resume:
        given = [k for k in SEARCH_OPTIONS if getattr(args, k) is not None]
        if given:
            raise UserError(f"--resume continues a sweep with its saved settings: drop --{given[0].replace('_', '-')}"
                            .replace("--overrides", "--set"))
        results = Path(args.results).resolve()
        name = args.name or latest_sweep(results)
        settings = load_settings(results / name)
        settings = dataclasses.replace(settings, results=str(results))
    else:
        settings = settings_from_args(args)
    report = run_sweep(settings, resume=args.resume, address=args.address)
    return 0 if report.best is not None else 1


if __name__ == "__main__":
    run_cli(main)
