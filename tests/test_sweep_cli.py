"""`python -m sweep.run`: help, and bad input refused with one line and exit 2 before Ray or data are touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import run_cli
from sweep.resources import plan_resources
from sweep.run import main
from sweep.settings import SweepSettings


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--gpus", "--gpus-per-trial", "--cpus-per-trial", "--trials", "--space", "--data", "--metric",
                   "--max-epochs", "--scheduler", "--grace-period", "--reduction-factor", "--name", "--results",
                   "--address", "--resume", "--seed", "--set", "--sampler", "--confirm-top", "--confirm-seeds",
                   "--ensemble-size", "--warm-start", "--budget", "config keys"):
        assert option in out, option


def test_more_gpus_than_the_machine_has(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    have = torch.cuda.device_count()
    err = _fails(["--gpus", str(have + 3), "--data", str(tmp_path / "no-data"), "--results", str(tmp_path)],
                 capsys)
    assert f"--gpus {have + 3}: this machine has {have} GPU(s)" in err
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0", "--gpus-per-trial", "0.5"], "--gpus-per-trial 0.5 needs GPUs"),
    (["--gpus", "0", "--cpus-per-trial", "64"], "--cpus-per-trial 64"),
    (["--trials", "0"], "--trials 0"),
    (["--budget", "0"], "--budget 0: must be at least 1 trial-epoch"),
    (["--set", "lr=0.1"], "'lr' is searched"),
    (["--set", "learning_rate=0.1"], "unknown config key 'learning_rate'"),
    (["--set", "epochs=3", "--max-epochs", "4"], "disagree"),
    (["--max-epochs", "0"], "config key 'epochs' = 0"),
    (["--space", "nope.yaml"], "nope.yaml"),
    (["--name", "a/b"], "--name"),
    (["--confirm-top", "-1"], "--confirm-top -1"),
    (["--warm-start", "/nonexistent/sweep"], "--warm-start /nonexistent/sweep: not a sweep folder"),
])
def test_bad_options(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --data names no dataset: had the options passed, the sweep would stop there, not run.
    err = _fails(argv + ["--results", str(tmp_path), "--data", str(tmp_path / "no-data")], capsys)
    assert message in err
    assert not list(tmp_path.glob("*/sweep.json"))


def test_bad_space_file_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  lr: {dist: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
                     "  colour_jitter: {dist: uniform, low: 0.0, high: 0.3}\n")
    err = _fails(["--space", str(space), "--gpus", "0", "--results", str(tmp_path),
                  "--data", str(tmp_path / "no-data")], capsys)
    assert f"{space}: unknown config key 'colour_jitter' (did you mean 'color_jitter'?)" in err


def test_space_is_checked_against_the_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  warmup_epochs: {dist: uniform, low: 0.0, high: 2.0}\n")
    err = _fails(["--space", str(space), "--max-epochs", "1", "--gpus", "0", "--results", str(tmp_path),
                  "--data", str(tmp_path / "no-data")], capsys)
    assert "parameter 'warmup_epochs' can take 2.0" in err and "[0, epochs]" in err


def test_resume_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no sweep in" in _fails(["--resume", "--results", str(tmp_path)], capsys)
    assert "no sweep to resume" in _fails(["--resume", "--name", "x", "--results", str(tmp_path)], capsys)
    assert "drop --trials" in _fails(["--resume", "--trials", "3", "--results", str(tmp_path)], capsys)
    assert "drop --set" in _fails(["--resume", "--set", "lr=1", "--results", str(tmp_path)], capsys)


def test_existing_sweep_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "sweep.json").write_text(json.dumps({"format": "lesion-sweep/sweep"}))
    err = _fails(["--name", "old", "--gpus", "0", "--results", str(tmp_path), "--data", str(tmp_path / "none")],
                 capsys)
    assert "already holds a sweep" in err and "--resume" in err


def test_slots_follow_gpus_and_cpus() -> None:
    assert plan_resources(SweepSettings(name="x", results="r"), 16, 4, "m").slots == 4
    four_per_gpu = plan_resources(SweepSettings(name="x", results="r", gpus=1, gpus_per_trial=0.25), 16, 4, "m")
    assert (four_per_gpu.slots, four_per_gpu.cpus_per_trial) == (4, 4)
    two_gpus_each = plan_resources(SweepSettings(name="x", results="r", gpus=4, gpus_per_trial=2), 16, 4, "m")
    assert (two_gpus_each.slots, two_gpus_each.cpus_per_trial) == (2, 8)
    cpu = plan_resources(SweepSettings(name="x", results="r", gpus=0, trials=3), 8, 0, "m")
    assert (cpu.slots, cpu.cpus_per_trial, cpu.gpus_per_trial) == (4, 2, 0.0)
    cpu_fixed = plan_resources(SweepSettings(name="x", results="r", gpus=0, cpus_per_trial=3), 8, 0, "m")
    assert cpu_fixed.slots == 2
    cpu_bound = plan_resources(SweepSettings(name="x", results="r", gpus=4, gpus_per_trial=0.5,
                                             cpus_per_trial=2), 6, 4, "m")
    assert cpu_bound.slots == 3  # 8 GPU slots, but only 3 trials' worth of CPUs


def test_missing_ray_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """As on an image with torch preinstalled but no Ray: the sweep says what to install."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    err = _fails(["--trials", "1", "--results", str(tmp_path), "--data", str(tmp_path / "no-data")], capsys)
    assert "the sweep needs ray, not installed" in err and "pip install" in err


def test_options_come_from_the_settings_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every SweepSettings field is an option whose help ends in the field's default; given nothing, the settings
    are the dataclass's defaults; given an option, that field."""
    import dataclasses

    from sweep.run import parser, settings_from_args
    from sweep.settings import flag

    text = " ".join(parser().format_help().split())
    fields = dataclasses.fields(SweepSettings)
    assert all(flag(f.name) in text for f in fields)
    assert f"(default {SweepSettings.__dataclass_fields__['confirm_top'].default})" in text
    plain = settings_from_args(parser().parse_args(["--name", "n", "--results", str(tmp_path)]))
    assert plain == SweepSettings(name="n", results=str(tmp_path.resolve()))
    given = settings_from_args(parser().parse_args(["--name", "n", "--results", str(tmp_path), "--budget", "7",
                                                    "--set", "lr=0.1", "--reduction-factor", "2.5"]))
    assert (given.budget, given.overrides, given.reduction_factor) == (7, ("lr=0.1",), 2.5)
