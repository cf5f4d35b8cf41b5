"""A sweep's settings: what it searches and how (saved as ``results/<name>/sweep.json``; --resume reads them).

Not a command; ``python -m sweep.run`` builds :class:`SweepSettings` from its options.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from core.io import atomic
from core import filenames
from core.config import TrainConfig
from core.metric_names import DEFAULT_METRIC, SELECT_METRICS, minimised
from core.errors import UserError
from core.io.state_files import read_json_object, reading
from sweep.schedule import DEFAULT_GRACE_PERIOD, DEFAULT_REDUCTION_FACTOR, Asha
from sweep.space import SearchSpace

DEFAULT_SPACE = "search_spaces/default.yaml"
SETTINGS_FILE = filenames.SWEEP_SETTINGS
SETTINGS_FORMAT = "lesion-sweep/sweep"
SPACE_COPY = filenames.SPACE_COPY
SCHEDULERS = ("asha", "none")
SAMPLERS = ("tpe", "random")
_ARG_TYPES = {"int": int, "float": float, "str": str}


def _option(help: str, *, default: object = None, shown: str | None = None, metavar: str | None = None,
            choices: tuple[str, ...] | None = None, searched: bool = True, required: bool = False) -> Any:
    """A setting and its ``python -m sweep.run`` option: ``help`` (the default is added to it: ``shown``, else the
    value), ``metavar``, ``choices``; ``searched``: the setting defines what the sweep searches (--resume keeps
    the saved value and refuses a new one)."""
    metadata = {"help": help, "shown": shown, "metavar": metavar, "choices": choices, "searched": searched}
    return field(metadata=metadata) if required else field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SweepSettings:
    """Everything a sweep depends on (saved as sweep.json; --resume reads it back). Each field is an option of
    ``python -m sweep.run`` (``--max-epochs`` for ``max_epochs``; ``--set`` for ``overrides``):
    :func:`add_options` makes them from here."""

    name: str = _option("sweep name (default: <space>-<date>-<time>); with --resume: the sweep to continue "
                        "(default: the latest)", searched=False, required=True)
    results: str = _option("results folder; the sweep lives in RESULTS/NAME/", default="results", metavar="DIR",
                           shown="results/", searched=False)
    gpus: int | None = _option("GPUs to use (0 trains on the CPU)", shown="all visible")
    gpus_per_trial: float | None = _option("GPUs per trial; fractions share a GPU (0.25: four trials per GPU)",
                                           shown="1", metavar="F")
    cpus_per_trial: int | None = _option("CPUs (torch threads) per trial", metavar="N",
                                         shown="the CPUs shared evenly among the trials that run at once")
    trials: int = _option("number of search trials", default=20)
    budget: int | None = _option("trial-epochs the search may spend: no new trial starts once the trials have run N "
                                 "epochs in all (running ones finish); --trials stays the most trials",
                                 shown="no limit", metavar="N")
    space: str = _option("search-space file", default=DEFAULT_SPACE, metavar="FILE")
    data: str | None = _option("dataset folder (HAM10000, ISIC 2018 or ImageFolder layout)", metavar="PATH",
                               shown="the built-in synthetic demo dataset")
    metric: str = _option("validation metric to optimise (maximised, a loss is minimised)",
                          default=DEFAULT_METRIC, choices=SELECT_METRICS)
    max_epochs: int | None = _option("epochs per trial", shown="the config's epochs", metavar="N")
    scheduler: str = _option("early stopping of poor trials", default="asha", choices=SCHEDULERS)
    grace_period: int | None = _option("ASHA: epochs before a trial can be stopped", metavar="N",
                                       shown=f"the space's asha:, else {DEFAULT_GRACE_PERIOD}")
    reduction_factor: float | None = _option("ASHA: keep 1/F of trials at each rung", metavar="F",
                                             shown=f"the space's asha:, else {DEFAULT_REDUCTION_FACTOR:g}")
    sampler: str = _option("Optuna sampler (random: a baseline, sweep/searcher.py)", default="tpe", choices=SAMPLERS)
    confirm_top: int = _option("after the search, train the K best configs again with new seeds (0: off)",
                               default=3, metavar="K")
    confirm_seeds: int = _option("new seeds per confirmed config", default=2, metavar="S")
    ensemble_size: int = _option("after the confirmation, choose an ensemble of up to N picks among the full-length "
                                 "runs, greedily on the validation split (ensemble.json; 1: off)", default=5,
                                 metavar="N")
    warm_start: str | None = _option("add the finished trials of an earlier sweep (same data, metric and fixed "
                                     "config; same searched keys) to the study before the first suggestion",
                                     shown="none", metavar="SWEEP_DIR")
    seed: int = _option("seed of the Optuna sampler", default=0)
    overrides: tuple[str, ...] = _option("fix a config key for every trial; repeatable", default=(),
                                         metavar="KEY=VALUE", shown="none")
    storage: str | None = _option("keep the sweep in object storage too, in PREFIX/NAME/: Ray's state, every trial's "
                                  "files and the outputs (for a cluster without a shared file system; credentials "
                                  "from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); with --resume: continue the sweep "
                                  "found there", shown="none", metavar="s3://BUCKET/PREFIX", searched=False)
    storage_endpoint: str | None = _option("URL of an S3-compatible server (SeaweedFS, MinIO, Ceph), e.g. "
                                           "http://127.0.0.1:8333", shown="AWS_ENDPOINT_URL, else AWS",
                                           metavar="URL", searched=False)

    @property
    def mode(self) -> str:
        return metric_mode(self.metric)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.results).resolve() / self.name

    def asha(self, space: SearchSpace, max_epochs: int) -> Asha | None:
        """The early-stopping settings (``--grace-period`` and ``--reduction-factor`` win over the space's)."""
        if self.scheduler == "none":
            return None
        grace = self.grace_period if self.grace_period is not None else space.asha.get("grace_period")
        factor = self.reduction_factor if self.reduction_factor is not None else space.asha.get("reduction_factor")
        return Asha.for_trials(max_epochs, grace, factor)

    def check(self) -> None:
        """Option values that are wrong whatever the space and data."""
        if self.metric not in SELECT_METRICS:
            raise UserError(f"--metric {self.metric!r}: expected one of {', '.join(SELECT_METRICS)}")
        if self.trials < 1:
            raise UserError(f"--trials {self.trials}: must be at least 1")
        if self.budget is not None and self.budget < 1:
            raise UserError(f"--budget {self.budget}: must be at least 1 trial-epoch")
        if self.sampler not in SAMPLERS:
            raise UserError(f"--sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"--scheduler {self.scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
        if self.grace_period is not None and self.grace_period < 1:
            raise UserError(f"--grace-period {self.grace_period}: must be at least 1")
        if self.reduction_factor is not None and not self.reduction_factor > 1:
            raise UserError(f"--reduction-factor {self.reduction_factor:g}: must be above 1")
        if self.confirm_top < 0 or self.confirm_seeds < 1:
            raise UserError(f"--confirm-top {self.confirm_top} / --confirm-seeds {self.confirm_seeds}: "
                            f"expected --confirm-top 0 or more and --confirm-seeds 1 or more")
        if self.ensemble_size < 1:
            raise UserError(f"--ensemble-size {self.ensemble_size}: must be at least 1 (1 turns the ensemble off)")


def metric_mode(metric: str) -> str:
    """'min' for a loss, else 'max': which way a metric is better."""
    return "min" if minimised(metric) else "max"


def base_config(space: SearchSpace, settings: SweepSettings) -> TrainConfig:
    """The fixed part of every trial's config: defaults, then the space's base, then --set, then --max-epochs."""
    cfg = TrainConfig.from_dict(space.base)
    cfg = cfg.with_overrides(settings.overrides)
    searched = [o.partition("=")[0].strip() for o in settings.overrides if o.partition("=")[0].strip() in space.keys]
    if searched:
        raise UserError(f"--set {searched[0]}=...: '{searched[0]}' is searched by {space.source}; "
                        f"drop it from --set or from the space")
    fixed: dict[str, Any] = {"select_metric": settings.metric}  # each trial's best.pt: its best epoch by the metric
    if settings.max_epochs is not None:
        if any(o.partition("=")[0].strip() == "epochs" for o in settings.overrides) \
                and cfg.epochs != settings.max_epochs:
            raise UserError(f"--max-epochs {settings.max_epochs} and --set epochs={cfg.epochs} disagree; give one")
        fixed["epochs"] = settings.max_epochs
    cfg = TrainConfig.from_dict(fixed, base=cfg)
    space.check_against(cfg)
    return cfg


def save_settings(settings: SweepSettings, space_text: str, base: TrainConfig, data: Mapping[str, str]) -> None:
    folder = settings.sweep_dir
    atomic.write_text(folder / SPACE_COPY, space_text)
    atomic.write_json(folder / SETTINGS_FILE, {
        "format": SETTINGS_FORMAT, "version": 1, "settings": dataclasses.asdict(settings),
        "base_config": base.to_dict(), "data": dict(data), "created": datetime.now().isoformat(timespec="seconds")})


def read_settings_file(folder: Path, missing: str) -> dict[str, Any]:
    doc = read_json_object(folder / SETTINGS_FILE, missing)
    if doc.get("format") != SETTINGS_FORMAT:
        raise UserError(f"{folder / SETTINGS_FILE}: not a sweep settings file")
    return doc


def load_settings(folder: Path) -> SweepSettings:
    """The settings saved in ``folder``; a damaged sweep.json is a one-line error (core/io/state_files.py)."""
    with reading(folder / SETTINGS_FILE, "start a new sweep with another --name", KeyError, TypeError, ValueError):
        values = dict(read_settings_file(folder, "no sweep to resume here")["settings"])
        values["overrides"] = tuple(values.get("overrides") or ())
        known = {f.name for f in dataclasses.fields(SweepSettings)}
        return SweepSettings(**{k: v for k, v in values.items() if k in known})


def latest_sweep(results: Path) -> str:
    candidates = sorted(results.glob(f"*/{SETTINGS_FILE}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"--resume: no sweep in {results}/ to resume; give --name")
    return candidates[-1].parent.name


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None


# --- the command line: every option of a setting is made from its field --------------------------------------
SEARCH_OPTIONS = tuple(f.name for f in dataclasses.fields(SweepSettings) if f.metadata["searched"])


def flag(name: str) -> str:
    """The option of setting ``name``: ``--max-epochs`` for max_epochs, ``--set`` for overrides."""
    return "--set" if name == "overrides" else "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`SweepSettings` field, its help ending in the default. Searched settings default to
    None here, so that --resume can tell which were given."""
    for f in dataclasses.fields(SweepSettings):
        info = f.metadata
        default = f"(default: {info['shown']})" if info["shown"] else f"(default {f.default})"
        kind = _ARG_TYPES[str(f.type).split(" ")[0].split("[")[0]] if f.name != "overrides" else str
        extra: dict[str, Any] = {"action": "append"} if f.name == "overrides" else {"type": kind}
        if info["choices"]:
            extra["choices"] = info["choices"]
        text = info["help"] if f.name == "name" else f"{info['help']} {default}"  # name's help says its default
        parser.add_argument(flag(f.name), dest=f.name, metavar=info["metavar"], help=text,
                            default=None if info["searched"] or f.name == "name" else f.default, **extra)
