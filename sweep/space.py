"""Search-space files (``search_spaces/*.yaml``): parsed, validated, and turned into an Optuna space.

    python -m sweep.space search_spaces/default.yaml     # validate a file and print what it searches

The schema is documented in ``search_spaces/README.md``. Parsing is side-effect free and strict:
an unknown config key, an unknown distribution, a bad range or a malformed condition raises
:class:`~core.errors.UserError` naming the file and the key, before any trial starts.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import yaml

from core.config import TrainConfig, field_type, parse_value
from core.errors import UserError, run_cli
from sweep.schedule import Asha, expected_budget

if TYPE_CHECKING:
    import optuna

DISTRIBUTIONS = ("loguniform", "uniform", "int", "categorical")
# Fixed for a whole sweep: the dataset is decoded (image_size) and split (fractions, seed) once, before
# any trial starts, and every trial must see the same validation images to be comparable.
NOT_SEARCHABLE = ("image_size", "val_fraction", "test_fraction", "split_seed")
_TOP_KEYS = ("description", "base", "params", "start_points", "asha")
DEFAULTS_POINT = "defaults"       # a start point: every searched key at its base value
# ``lr@convnext``: config key ``lr`` under a range of its own, for the trials its ``when`` picks (per-arch ranges).
# Optuna keeps one distribution per parameter name, so each range is a parameter of its own name.
CASE_MARK = "@"


def config_key(name: str) -> str:
    """The config key a searched parameter sets: ``lr`` for ``lr`` and for ``lr@convnext``."""
    return name.partition(CASE_MARK)[0]


def config_values(sampled: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled values by config key (``lr@convnext`` -> ``lr``), as its config takes them."""
    return {config_key(name): value for name, value in sampled.items()}
_PARAM_FIELDS = {
    "loguniform": ("dist", "low", "high", "when"),
    "uniform": ("dist", "low", "high", "step", "when"),
    "int": ("dist", "low", "high", "step", "log", "when"),
    "categorical": ("dist", "choices", "when"),
}


@dataclass(frozen=True)
class Param:
    """One searched config key and its distribution; ``when`` maps parent keys to allowed values.

    ``name`` is the config key, or ``KEY@LABEL`` for one of several ranges of the same key (the parameter's
    name in Optuna and trials.csv); :attr:`key` is the config key either way."""

    name: str
    dist: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def key(self) -> str:
        return config_key(self.name)

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether this parameter is sampled, given the values sampled before it."""
        return all(parent in values and values[parent] in allowed for parent, allowed in self.when)

    def suggest(self, trial: optuna.trial.Trial) -> Any:
        """Draw a value from an ``optuna.trial.Trial`` (define-by-run)."""
        if self.dist == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.dist == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high),
                                   step=None if self.step is None else float(self.step),
                                   log=self.dist == "loguniform")

    def distribution(self) -> Any:
        """The Optuna distribution :meth:`suggest` draws from (equal to the one Optuna records)."""
        from optuna import distributions as d

        if self.dist == "categorical":
            return d.CategoricalDistribution(list(self.choices))
        if self.dist == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.FloatDistribution(float(self.low), float(self.high), log=self.dist == "loguniform",
                                   step=None if self.step is None else float(self.step))

    def contains(self, value: object) -> bool:
        """Whether ``value`` is one this parameter can take (a choice, or in range and on the step grid)."""
        if self.dist == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.dist == "int" and not float(value).is_integer():
            return False
        if self.step is None:
            return True
        steps = (value - self.low) / self.step
        return abs(steps - round(steps)) < 1e-6

    def describe(self) -> str:
        if self.dist == "categorical":
            text = f"categorical {list(self.choices)}"
        else:
            text = f"{self.dist} [{self.low}, {self.high}]" + (f" step {self.step}" if self.step else "") \
                + (" log" if self.log and self.dist == "int" else "")
        if self.when:
            text += " when " + " and ".join(
                f"{k} in {list(v)}" if len(v) > 1 else f"{k} = {v[0]}" for k, v in self.when)
        return text


@dataclass(frozen=True)
class SearchSpace:
    """A parsed space file: fixed ``base`` config values and the searched ``params`` (file order)."""

    source: str
    description: str
    base: Mapping[str, Any] = field(default_factory=dict)
    params: tuple[Param, ...] = ()
    start_points: tuple[Mapping[str, Any], ...] = ()   # evaluated first, in this order (partial: rest sampled)
    asha: Mapping[str, Any] = field(default_factory=dict)  # grace_period / reduction_factor for this space

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys the space searches (a key with ranges per case once)."""
        return tuple(dict.fromkeys(p.key for p in self.params))

    def sample(self, trial: optuna.trial.Trial) -> dict[str, Any]:
        """Define-by-run for OptunaSearch: the sampled values of the active parameters."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.active(values):
                values[param.name] = param.suggest(trial)
        return values

    def distributions(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The Optuna distribution of each searched key in ``values`` (as a trial that sampled them records)."""
        return {p.name: p.distribution() for p in self.params if p.name in values}

    def check_against(self, base: TrainConfig) -> None:
        """Every value a parameter can take must make a valid config on top of ``base``.

        Checks each range's ends and every choice, one parameter at a time, so a value that the
        config would refuse (a learning rate of 0, warm-up longer than the epochs) fails now,
        not in a trial hours later.
        """
        for param in self.params:
            for value in _corner_values(param):
                try:
                    TrainConfig.from_dict({param.key: value}, base=base)
                except UserError as exc:
                    raise UserError(f"{self.source}: parameter '{param.name}' can take {value!r}, "
                                    f"which the config refuses: {exc}") from None

    def describe(self) -> str:
        lines = [f"{self.source}: {self.description}".rstrip(": ")]
        lines += [f"  {p.name}: {p.describe()}" for p in self.params]
        if self.base:
            lines.append("  fixed: " + ", ".join(f"{k}={v}" for k, v in self.base.items()))
        for number, point in enumerate(self.start_points, 1):
            lines.append(f"  start point {number}: " + ", ".join(f"{k}={v}" for k, v in point.items()))
        return "\n".join(lines)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; a problem is a :class:`UserError` naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such search-space file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the search-space file ({exc})") from None
    return parse_space(text, source=str(path))


def parse_space(text: str, source: str = "<space>") -> SearchSpace:
    """Parse the YAML ``text`` of a space file (``source`` names it in errors)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{source}: a search space must be a mapping with 'params' (and optionally 'base')")
    unknown = [k for k in doc if k not in _TOP_KEYS]
    if unknown:
        raise UserError(f"{source}: unknown top-level key '{unknown[0]}' (expected one of {_TOP_KEYS})")
    description = doc.get("description") or ""
    if not isinstance(description, str):
        raise UserError(f"{source}: 'description' must be a string")
    base = _parse_base(doc.get("base") or {}, source)
    raw_params = doc.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise UserError(f"{source}: 'params' must be a non-empty mapping of config key -> distribution")
    params: list[Param] = []
    for name, spec in raw_params.items():
        params.append(_parse_param(str(name), spec, source, {p.name: p for p in params}))
        if params[-1].key in base:
            raise UserError(f"{source}: key '{params[-1].key}' is both fixed in 'base' and searched in 'params'")
    _check_cases(params, source)
    start_points = _parse_start_points(doc.get("start_points"), params, base, source)
    space = SearchSpace(source=source, description=description.strip(), base=base, params=tuple(params),
                        start_points=start_points, asha=_parse_asha(doc.get("asha"), source))
    space.check_against(TrainConfig.from_dict(base))
    return space


def _parse_base(raw: object, source: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: 'base' must be a mapping of config key -> value")
    values = {str(k): _coerce(str(k), v, source, "base") for k, v in raw.items()}
    try:
        TrainConfig.from_dict(values)
    except UserError as exc:
        raise UserError(f"{source}: base: {exc}") from None
    return values


def _parse_param(name: str, spec: object, source: str, earlier: Mapping[str, Param]) -> Param:
    where, key, label = f"{source}: parameter '{name}'", *(name.split(CASE_MARK, 1) + [None])[:2]
    if label is not None and not (label.replace("_", "").replace("-", "").isalnum() and label.isascii()):
        raise UserError(f"{where}: after '{CASE_MARK}' give a label of letters, digits, '_' or '-' "
                        f"(e.g. {key}{CASE_MARK}convnext: a range of '{key}' of its own, with a 'when')")
    try:
        kind = field_type(key)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    if key in NOT_SEARCHABLE:
        raise UserError(f"{where}: '{key}' cannot be searched (the data is decoded and split once per sweep); "
                        f"fix it under 'base' or with --set")
    if not isinstance(spec, dict) or "dist" not in spec:
        raise UserError(f"{where}: expected a mapping with 'dist' (one of {DISTRIBUTIONS})")
    dist = spec["dist"]
    if dist not in DISTRIBUTIONS:
        raise UserError(f"{where}: unknown distribution {dist!r} (expected one of {DISTRIBUTIONS})")
    extra = [k for k in spec if k not in _PARAM_FIELDS[dist]]
    if extra:
        raise UserError(f"{where}: unknown field '{extra[0]}' for a {dist} distribution "
                        f"(allowed: {', '.join(_PARAM_FIELDS[dist])})")
    when = _parse_when(spec.get("when"), where, earlier)

    if dist == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: 'choices' must be a non-empty list")
        values = tuple(_coerce(key, c, source, "choices") for c in choices)
        if len(set(map(repr, values))) != len(values):
            raise UserError(f"{where}: 'choices' lists a value twice")
        return Param(name, dist, choices=values, when=when)

    if kind not in (int, float):
        raise UserError(f"{where}: a {dist} distribution needs a numeric key, but '{key}' is a "
                        f"{kind.__name__} (use categorical)")
    if dist in ("uniform", "loguniform") and kind is int:
        raise UserError(f"{where}: '{key}' is an integer key: use dist 'int'")
    for key in ("low", "high"):
        if key not in spec:
            raise UserError(f"{where}: '{key}' is missing")
    low, high = (_number(spec[k], f"{where}: '{k}'") for k in ("low", "high"))
    step = None if spec.get("step") is None else _number(spec["step"], f"{where}: 'step'")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: 'log' must be true or false")
    if dist == "int":
        if not all(float(v).is_integer() for v in (low, high) + ((step,) if step is not None else ())):
            raise UserError(f"{where}: an int distribution needs whole numbers for low, high and step")
        low, high = int(low), int(high)
        step = None if step is None else int(step)
        if step is not None and log:
            raise UserError(f"{where}: 'step' and 'log' cannot be combined")
    if not low < high:
        raise UserError(f"{where}: 'low' ({low}) must be below 'high' ({high})")
    if (dist == "loguniform" or log) and low <= 0:
        raise UserError(f"{where}: a log distribution needs low > 0 (got {low})")
    if step is not None and not 0 < step <= high - low:
        raise UserError(f"{where}: 'step' ({step}) must be in (0, high - low]")
    return Param(name, dist, low=low, high=high, step=step, log=log or dist == "loguniform", when=when)


def _check_cases(params: Sequence[Param], source: str) -> None:
    """Parameters that set the same config key (``lr`` and ``lr@convnext``) must never be sampled together:
    both need a ``when`` on one categorical parameter, with no allowed value in common."""
    for i, first in enumerate(params):
        for second in params[i + 1:]:
            if first.key != second.key:
                continue
            theirs = dict(second.when)
            if not any(parent in theirs and not set(allowed) & set(theirs[parent]) for parent, allowed in first.when):
                raise UserError(f"{source}: parameters '{first.name}' and '{second.name}' both set '{first.key}' and "
                                f"can be sampled in the same trial: give each a 'when' on the same categorical "
                                f"parameter with no value in common (e.g. {{arch: [resnet18]}} and "
                                f"{{arch: [convnext_tiny]}})")


def _parse_when(raw: object, where: str, earlier: Mapping[str, Param]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: 'when' must map a parameter to a value or a list of values")
    conditions = []
    for parent, allowed in raw.items():
        if parent not in earlier:
            raise UserError(f"{where}: 'when' refers to '{parent}', which is not a parameter searched "
                            f"above it in the file")
        parent_param = earlier[parent]
        if parent_param.dist != "categorical":
            raise UserError(f"{where}: 'when' can only depend on a categorical parameter ('{parent}' is "
                            f"{parent_param.dist})")
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        for value in values:
            if value not in parent_param.choices:
                raise UserError(f"{where}: 'when' expects {parent}={value!r}, which is not one of its "
                                f"choices {list(parent_param.choices)}")
        conditions.append((str(parent), values))
    return tuple(conditions)


def _parse_start_points(raw: object, params: Sequence[Param], base: Mapping[str, Any],
                        source: str) -> tuple[dict[str, Any], ...]:
    """``start_points:``: configs to evaluate first; each a mapping of searched keys, or ``defaults``."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise UserError(f"{source}: 'start_points' must be a list of mappings (searched key -> value) or "
                        f"'{DEFAULTS_POINT}'")
    base_config = TrainConfig.from_dict(base)
    points = []
    for number, item in enumerate(raw, 1):
        where = f"{source}: start point {number}"
        if item == DEFAULTS_POINT:
            values: dict[str, Any] = {}
            for param in params:  # each searched key at its base value, where its conditions allow it
                if param.active(values):
                    values[param.name] = getattr(base_config, param.key)
        elif isinstance(item, dict) and item:
            values = {str(k): _coerce(config_key(str(k)), v, source, f"start point {number}") for k, v in item.items()}
        else:
            raise UserError(f"{where}: expected a mapping of searched key -> value, or '{DEFAULTS_POINT}'")
        _check_point(values, params, where)
        points.append(values)
    return tuple(points)


def _check_point(values: Mapping[str, Any], params: Sequence[Param], where: str) -> None:
    by_name = {p.name: p for p in params}
    for key, value in values.items():
        param = by_name.get(key)
        if param is None:
            raise UserError(f"{where}: '{key}' is not a searched parameter (start points give values of 'params')")
        if not param.contains(value):
            raise UserError(f"{where}: {key}={value!r} is not a value the space can take ({param.describe()})")
        for parent, allowed in param.when:
            if parent not in values:
                raise UserError(f"{where}: '{key}' is searched only when {parent} is one of {list(allowed)}: "
                                f"give '{parent}' too")
            if values[parent] not in allowed:
                raise UserError(f"{where}: '{key}' is searched only when {parent} is one of {list(allowed)}, "
                                f"but the point has {parent}={values[parent]!r}")


def _parse_asha(raw: object, source: str) -> dict[str, Any]:
    """``asha: {grace_period: N, reduction_factor: F}``: the early-stopping rungs this space is meant for."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - {"grace_period", "reduction_factor"}:
        raise UserError(f"{source}: 'asha' must be a mapping with 'grace_period' and/or 'reduction_factor'")
    out: dict[str, Any] = {}
    if "grace_period" in raw:
        grace = raw["grace_period"]
        if isinstance(grace, bool) or not isinstance(grace, int) or grace < 1:
            raise UserError(f"{source}: asha: 'grace_period' must be a whole number of epochs, at least 1")
        out["grace_period"] = grace
    if "reduction_factor" in raw:
        factor = _number(raw["reduction_factor"], f"{source}: asha: 'reduction_factor'")
        if not factor > 1:
            raise UserError(f"{source}: asha: 'reduction_factor' must be above 1")
        out["reduction_factor"] = float(factor)
    return out


def _coerce(key: str, value: object, source: str, what: str) -> Any:
    """YAML reads ``1e-4`` as a string: give numeric keys their numbers, leave the rest to the config."""
    try:
        kind = field_type(key)
    except UserError as exc:
        raise UserError(f"{source}: {what}: {exc}") from None
    if isinstance(value, str) and kind in (int, float):
        return parse_value(key, value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _number(value: object, where: str) -> float | int:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{where} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value!r}")
    return value


def _corner_values(param: Param) -> Sequence[Any]:
    if param.dist == "categorical":
        return param.choices
    return (param.low, param.high)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweep.space",
                                     description="Validate search-space files and print what they search, with "
                                                 "ASHA's rungs and the budget it is expected to spend.")
    parser.add_argument("files", nargs="+", help="search_spaces/*.yaml files")
    parser.add_argument("--trials", type=int, default=20, help="trials of the budget estimate (default 20)")
    args = parser.parse_args(argv)
    for name in args.files:
        space = load_space(name)
        epochs = TrainConfig.from_dict(space.base).epochs
        asha = Asha.for_trials(epochs, space.asha.get("grace_period"), space.asha.get("reduction_factor"))
        budget = expected_budget(asha, args.trials)
        print(space.describe())
        print(f"  {asha.describe()}\n  expected budget of {args.trials} trials: {budget:.0f} trial-epochs = "
              f"{budget / epochs:.1f} x one {epochs}-epoch training (without early stopping: {args.trials} x); "
              f"ASHA can spend less or more (a strong early trial stops later ones sooner): python -m sweep.run "
              f"--budget {math.ceil(budget)} caps it")
    return 0


if __name__ == "__main__":
    run_cli(main)
