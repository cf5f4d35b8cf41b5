import dataclasses
import json
import subprocess
import sys

import pytest

from core.config import TrainConfig, parse_value
from core.errors import UserError
from tests.paths import REPO


def test_every_key_is_documented_with_its_default():
    text = TrainConfig.describe()
    for f in dataclasses.fields(TrainConfig):
        assert len(f.metadata.get("doc", "")) > 10, f"{f.name} has no real docstring"
        assert f"  {f.name} (" in text and f"default {f.default!r}): {f.metadata['doc']}" in text, f.name
    assert TrainConfig.from_dict({}) == TrainConfig()  # the defaults themselves pass validation


def test_json_round_trip(tmp_path):
    cfg = TrainConfig(lr=3e-4, hflip=False, class_weighting="effective", image_size=64)
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert TrainConfig.load(path) == cfg
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(UserError, match=r"unknown config key 'lrr' \(did you mean 'lr'\?\)"):
        TrainConfig.from_dict({"lrr": 0.1})


@pytest.mark.parametrize("values, key", [
    ({"lr": "fast"}, "lr"),
    ({"epochs": 2.5}, "epochs"),
    ({"hflip": 1}, "hflip"),
    ({"batch_size": True}, "batch_size"),
    ({"lr": -1.0}, "lr"),
    ({"class_weighting": "balanced"}, "class_weighting"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"val_fraction": 0.5, "test_fraction": 0.45}, "val_fraction"),
    ({"lr": float("nan")}, "lr"),
])
def test_bad_values_name_the_key(values, key):
    with pytest.raises(UserError, match=f"'{key}'"):
        TrainConfig.from_dict(values)


def test_int_is_accepted_for_float():
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0


def test_overrides_parse_by_type():
    cfg = TrainConfig().with_overrides(["lr=0.01", "epochs=3", "hflip=false", "pretrained=none"])
    assert (cfg.lr, cfg.epochs, cfg.hflip, cfg.pretrained) == (0.01, 3, False, "none")
    with pytest.raises(UserError, match="'epochs'"):
        TrainConfig().with_overrides(["epochs=three"])
    with pytest.raises(UserError, match="key=value"):
        TrainConfig().with_overrides(["epochs"])
    assert parse_value("rot90", "on") is True


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="no such config file"):
        TrainConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        TrainConfig.load(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"learning_rate": 1}')
    with pytest.raises(UserError, match="unknown.json: unknown config key 'learning_rate'"):
        TrainConfig.load(unknown)


def test_cli_reports_an_unknown_key_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "core.train", "--out", str(tmp_path / "run"), "--set", "lrr=0.1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown config key 'lrr' (did you mean 'lr'?)"]
    assert not (tmp_path / "run").exists()
