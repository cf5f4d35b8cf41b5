"""A sweep's settings: what it searches and how (saved as ``results/<name>/sweep.json``; --resume reads them).

Not a command; ``python -m sweep.run`` builds :class:`SweepSettings` from its options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from core import atomic
from core.config import SELECT_METRICS, TrainConfig
from core.errors import UserError
from core.state_files import reading
from sweep.schedule import Asha
from sweep.space import SearchSpace

DEFAULT_SPACE = "search_spaces/default.yaml"
SETTINGS_FILE = "sweep.json"
SETTINGS_FORMAT = "lesion-sweep/sweep"
SPACE_COPY = "space.yaml"
# Options that define what a sweep searches; --resume keeps the saved ones.
SEARCH_OPTIONS = ("space", "data", "metric", "max_epochs", "scheduler", "grace_period", "reduction_factor", "trials",
                  "budget", "sampler", "seed", "overrides", "gpus", "gpus_per_trial", "cpus_per_trial", "confirm_top",
                  "confirm_seeds", "warm_start")


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
    grace_period: int | None = None   # None: the space's asha: settings, else sweep/schedule.py's defaults
    reduction_factor: float | None = None
    trials: int = 20
    budget: int | None = None         # trial-epochs: no new trial starts once the search has run this many
    sampler: str = "tpe"              # "random": a baseline (sweep/searcher.py)
    seed: int = 0
    overrides: tuple[str, ...] = ()
    gpus: int | None = None           # None: all visible
    gpus_per_trial: float | None = None
    cpus_per_trial: int | None = None
    confirm_top: int = 3              # configs trained again with new seeds after the search (0: none)
    confirm_seeds: int = 2            # new seeds per confirmed config
    warm_start: str | None = None     # an earlier sweep's folder whose finished trials seed the study
    storage: str | None = None        # s3://bucket/prefix: the sweep also lives in prefix/<name>/ (sweep/storage.py)
    storage_endpoint: str | None = None   # an S3-compatible server's URL (None: AWS_ENDPOINT_URL, else AWS)

    @property
    def mode(self) -> str:
        return "min" if self.metric.endswith("loss") else "max"

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
        if self.sampler not in ("tpe", "random"):
            raise UserError(f"--sampler {self.sampler!r}: expected 'tpe' or 'random'")
        if self.scheduler not in ("asha", "none"):
            raise UserError(f"--scheduler {self.scheduler!r}: expected 'asha' or 'none'")
        if self.grace_period is not None and self.grace_period < 1:
            raise UserError(f"--grace-period {self.grace_period}: must be at least 1")
        if self.reduction_factor is not None and not self.reduction_factor > 1:
            raise UserError(f"--reduction-factor {self.reduction_factor:g}: must be above 1")
        if self.confirm_top < 0 or self.confirm_seeds < 1:
            raise UserError(f"--confirm-top {self.confirm_top} / --confirm-seeds {self.confirm_seeds}: "
                            f"expected --confirm-top 0 or more and --confirm-seeds 1 or more")


def base_config(space: SearchSpace, settings: SweepSettings) -> TrainConfig:
    """The fixed part of every trial's config: defaults, then the space's base, then --set, then --max-epochs."""
    cfg = TrainConfig.from_dict(space.base)
    cfg = cfg.with_overrides(settings.overrides)
    searched = [o.partition("=")[0].strip() for o in settings.overrides if o.partition("=")[0].strip() in space.names]
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
    doc = atomic.read_json_object(folder / SETTINGS_FILE, missing)
    if doc.get("format") != SETTINGS_FORMAT:
        raise UserError(f"{folder / SETTINGS_FILE}: not a sweep settings file")
    return doc


def load_settings(folder: Path) -> SweepSettings:
    """The settings saved in ``folder``; a damaged sweep.json is a one-line error (core/state_files.py)."""
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
