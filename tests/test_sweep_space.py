"""Search-space files: parsing, validation errors that name the key, Optuna sampling with conditions."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from core.config import TrainConfig
from core.errors import UserError
from sweep.space import load_space, parse_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def test_shipped_spaces_parse_and_cover_the_issue() -> None:
    default = load_space(SPACES / "default.yaml")
    for key in ("lr", "weight_decay", "label_smoothing", "class_weighting", "effective_beta", "hflip", "vflip",
                "rot90", "rotation_degrees", "crop_scale_min", "color_jitter", "ema_decay", "sampling"):
        assert key in default.names, key
    assert TrainConfig.from_dict(default.base).epochs == 50  # trials as long as the final training
    wd = next(p for p in default.params if p.name == "weight_decay")
    assert wd.low <= 1e-5 and wd.high >= 0.3  # up to the strong decay long runs need
    beta = next(p for p in default.params if p.name == "effective_beta")
    assert beta.when == (("class_weighting", ("effective",)),)
    lr = next(p for p in default.params if p.name == "lr")
    assert lr.dist == "loguniform" and lr.log and 0 < lr.low < lr.high

    quick = load_space(SPACES / "quick.yaml")
    base = TrainConfig.from_dict(quick.base)
    assert 32 <= base.image_size <= 48 and base.epochs <= 3 and base.pretrained == "none"


def test_conditional_parameter_is_sampled_only_when_its_parent_allows() -> None:
    space = load_space(SPACES / "default.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3), direction="maximize")
    seen_beta = {True: 0, False: 0}
    for _ in range(40):
        trial = study.ask()
        values = space.sample(trial)
        cfg = TrainConfig.from_dict(values)  # every sample is a valid config
        assert ("effective_beta" in values) == (cfg.class_weighting == "effective")
        seen_beta["effective_beta" in values] += 1
        assert 1e-4 <= values["lr"] <= 5e-3
        study.tell(trial, 0.5)
    assert seen_beta[True] and seen_beta[False]


def test_same_seed_same_samples() -> None:
    space = load_space(SPACES / "quick.yaml")

    def draws(seed: int) -> list[dict]:
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="maximize")
        out = []
        for _ in range(4):
            trial = study.ask()
            out.append(space.sample(trial))
            study.tell(trial, 0.0)
        return out

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_numbers_written_as_yaml_strings_are_read_as_numbers() -> None:
    space = parse_space("params:\n  lr: {dist: loguniform, low: 1e-5, high: 1e-2}\n"
                        "  weight_decay: {dist: categorical, choices: [1e-4, 0.01]}\n")
    lr, wd = space.params
    assert (lr.low, lr.high) == (1e-5, 1e-2)
    assert wd.choices == (1e-4, 0.01)


_POINTS = """params:
  lr: {dist: loguniform, low: 1.0e-4, high: 1.0e-2}
  class_weighting: {dist: categorical, choices: [none, effective]}
  effective_beta: {dist: categorical, choices: [0.99, 0.999], when: {class_weighting: effective}}
"""


def test_start_points_defaults_and_partial_points() -> None:
    space = parse_space(_POINTS + "start_points:\n  - defaults\n"
                                  "  - {class_weighting: effective, effective_beta: 0.99}\n")
    assert space.start_points == ({"lr": 1e-3, "class_weighting": "none"},  # beta: not searched with 'none'
                                  {"class_weighting": "effective", "effective_beta": 0.99})


def test_distributions_are_the_ones_optuna_records() -> None:
    """A warm start copies trials with these distributions; TPE only pools trials whose distributions match."""
    space = load_space(SPACES / "default.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        space.sample(trial)
        study.tell(trial, 0.0)
    for trial in study.trials:
        assert space.distributions(trial.params) == trial.distributions
        assert all(p.contains(trial.params[p.name]) for p in space.params if p.name in trial.params)


_ARCH = "params:\n  arch: {dist: categorical, choices: [resnet18, convnext_tiny]}\n"


@pytest.mark.parametrize("text, named", [
    ("params:\n  learning_rate: {dist: loguniform, low: 1.0e-4, high: 1.0e-2}\n", "learning_rate"),
    ("params:\n  lr: {dist: gaussian, low: 1.0e-4, high: 1.0e-2}\n", "gaussian"),
    ("params:\n  lr: {dist: loguniform, low: 1.0e-2, high: 1.0e-4}\n", "'lr'"),
    ("params:\n  lr: {dist: loguniform, low: 0.0, high: 1.0e-2}\n", "'lr'"),
    ("params:\n  lr: {dist: uniform, low: abc, high: 1.0e-2}\n", "'lr'"),
    ("params:\n  lr: {dist: uniform, low: 1.0e-4}\n", "'high'"),
    ("params:\n  lr: {dist: uniform, low: 1.0e-4, high: 0.1, hi: 3}\n", "'hi'"),
    ("params:\n  label_smoothing: {dist: uniform, low: 0.0, high: 0.5}\n", "label_smoothing"),
    ("params:\n  batch_size: {dist: uniform, low: 8, high: 64}\n", "batch_size"),
    ("params:\n  batch_size: {dist: int, low: 8.5, high: 64}\n", "batch_size"),
    ("params:\n  hflip: {dist: uniform, low: 0, high: 1}\n", "hflip"),
    ("params:\n  class_weighting: {dist: categorical, choices: [none, balanced]}\n", "class_weighting"),
    ("params:\n  class_weighting: {dist: categorical, choices: []}\n", "class_weighting"),
    ("params:\n  image_size: {dist: categorical, choices: [32, 64]}\n", "image_size"),
    ("params:\n  effective_beta: {dist: uniform, low: 0.9, high: 0.99, when: {class_weighting: effective}}\n",
     "class_weighting"),
    ("params:\n  class_weighting: {dist: categorical, choices: [none, effective]}\n"
     "  effective_beta: {dist: uniform, low: 0.9, high: 0.99, when: {class_weighting: inverse}}\n", "inverse"),
    ("base:\n  epochs: 2\nparams:\n  warmup_epochs: {dist: uniform, low: 0.0, high: 3.0}\n", "warmup_epochs"),
    ("base:\n  epoch: 2\nparams:\n  lr: {dist: loguniform, low: 1.0e-4, high: 1.0e-2}\n", "epoch"),
    ("base:\n  lr: 0.1\nparams:\n  lr: {dist: loguniform, low: 1.0e-4, high: 1.0e-2}\n", "lr"),
    ("spaces:\n  lr: 1\n", "spaces"),
    ("params: {}\n", "params"),
    ("params: [lr]\n", "params"),
    ("params:\n  lr: [1, 2\n", "YAML"),
    (_POINTS + "start_points: [{learning_rate: 0.001}]\n", "start point 1: unknown config key 'learning_rate'"),
    (_POINTS + "start_points: [{weight_decay: 0.01}]\n", "start point 1: 'weight_decay' is not a searched"),
    (_POINTS + "start_points: [{lr: 0.5}]\n", "start point 1: lr=0.5"),
    (_POINTS + "start_points: [{lr: 0.001}, {class_weighting: balanced}]\n", "start point 2: class_weighting"),
    (_POINTS + "start_points: [{effective_beta: 0.99}]\n", "give 'class_weighting' too"),
    (_POINTS + "start_points: [{class_weighting: none, effective_beta: 0.99}]\n", "class_weighting='none'"),
    (_POINTS + "start_points: defaults\n", "'start_points' must be a list"),
    (_POINTS + "asha: {grace_period: 0}\n", "grace_period"),
    (_ARCH + "  lr: {dist: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
     "  lr@convnext: {dist: loguniform, low: 1.0e-5, high: 1.0e-3, when: {arch: convnext_tiny}}\n",
     "'lr' and 'lr@convnext' both set 'lr'"),
    (_ARCH + "  lr@a: {dist: loguniform, low: 1.0e-4, high: 1.0e-2, when: {arch: [resnet18, convnext_tiny]}}\n"
     "  lr@b: {dist: loguniform, low: 1.0e-5, high: 1.0e-3, when: {arch: convnext_tiny}}\n", "can be sampled in the same"),
    (_ARCH + "  lr@: {dist: loguniform, low: 1.0e-4, high: 1.0e-2}\n", "after '@' give a label"),
    (_ARCH + "  lrate@x: {dist: loguniform, low: 1.0e-4, high: 1.0e-2}\n", "unknown config key 'lrate'"),
    (_ARCH + "  label_smoothing@x: {dist: uniform, low: 0.0, high: 0.5, when: {arch: resnet18}}\n",
     "'label_smoothing@x' can take 0.5"),
    ("base:\n  lr: 0.1\n" + _ARCH + "  lr@x: {dist: loguniform, low: 1.0e-4, high: 1.0e-2}\n", "both fixed"),
])
def test_bad_space_is_rejected_naming_the_key(text: str, named: str) -> None:
    with pytest.raises(UserError) as info:
        parse_space(text, source="bad.yaml")
    message = str(info.value)
    assert message.startswith("bad.yaml: ")
    assert named in message


def test_missing_space_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such search-space file"):
        load_space(tmp_path / "nope.yaml")


def test_space_command_validates_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sweep.space import main

    assert main([str(SPACES / "quick.yaml")]) == 0
    assert "lr: loguniform" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  lr: {dist: loguniform, low: 1.0e-2, high: 1.0e-4}\n")
    with pytest.raises(UserError, match="bad.yaml: parameter 'lr'"):
        main([str(bad)])


def test_a_range_per_arch_is_sampled_under_its_own_name_and_sets_the_one_key(tmp_path: Path) -> None:
    """models.yaml's lr, lr@convnext and lr@mobile: TPE (as the sweep sets it up) samples exactly the range of the
    trial's arch, and the trial's config, best.json's config and --set know one key, lr."""
    from sweep import searcher
    from sweep.space import config_values
    from sweep.trainable import TrialSetup, trial_config

    space = load_space(SPACES / "models.yaml")
    ranges = {p.name: p for p in space.params if p.key == "lr"}
    assert set(ranges) == {"lr", "lr@convnext", "lr@mobile"} and space.keys.count("lr") == 1
    assert ranges["lr@convnext"].high < ranges["lr"].high < ranges["lr@mobile"].high
    sampler = searcher.make_sampler("tpe", seed=0, slots=1, trials=30, conditional=True)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    setup = TrialSetup(base=TrainConfig.from_dict(space.base).to_dict(), trials_dir=str(tmp_path), cpus=1, gpus=0)
    archs = set()
    for _ in range(30):  # past the 10 random start-up trials: TPE's own proposals too
        trial = study.ask()
        values = space.sample(trial)
        case = [name for name in ranges if name in values]
        assert len(case) == 1 and ranges[case[0]].active(values) and ranges[case[0]].contains(values[case[0]])
        config = trial_config(values, setup)
        assert config.arch == values["arch"] and config.lr == values[case[0]] == config_values(values)["lr"]
        archs.add(values["arch"])
        study.tell(trial, config.lr * (2.0 if config.arch == "convnext_tiny" else 1.0))
    assert len(archs) >= 4
    with pytest.raises(UserError, match="'lr' is searched by"):
        from sweep.settings import SweepSettings, base_config

        base_config(space, SweepSettings(name="x", space=SPACES / "models.yaml", overrides=("lr=0.01",)))
