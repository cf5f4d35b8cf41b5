"""Fault injection: damaged state files, impossible output places, a full disk and SIGKILLs (issue 15).

Every fault must end in one ``error:`` line naming the file, exit status 2 and no traceback, or in a clean
recovery; and nothing may be left looking complete that is not (a run.json saying complete, a metrics.json,
a best.json). One tiny generated dataset (32 px) and one finished run and final training serve every test;
commands run in this process through ``run_cli`` (as ``python -m`` runs them), except the SIGKILL tests,
which kill real subprocesses. The read-only and full-disk tests mount a tmpfs (root only; skipped with the
reason elsewhere).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch

from core.config import TrainConfig
from core.errors import UserError, run_cli
from core.evaluate import main as evaluate
from core.final_train import main as final_main
from core.predict import main as predict
from core.train import main as train_main
from tests.paths import REPO

SIZE = 32
SETTINGS = {"image_size": SIZE, "epochs": 2, "pretrained": "none", "batch_size": 16, "warmup_epochs": 0.0,
            "crop_scale_min": 1.0, "color_jitter": 0.0, "device": "cpu", "eval_batch_size": 64}
CFG = TrainConfig(**SETTINGS)
SET = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]


# --- shared set-up ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(module_tmp: Path) -> dict[str, Path]:
    """Tiny demo data; a finished core.train run; a sweep folder (best.json, splits.csv) and its final training."""
    from core.data.dataset import load_for_config
    from core.data.demo_data import generate_demo
    from core.final_train import FinalOptions, final_train
    from core.train import RunOptions, train

    base = module_tmp
    root = generate_demo(base / "data", n_lesions=30, image_size=SIZE, seed=3)
    data = load_for_config(root, CFG, progress=False)
    run = base / "run"
    train(CFG, data, run, options=RunOptions(progress=False, tensorboard=False))
    sweep = base / "sweep"
    shutil.copytree(run, sweep / "trials" / "t1")
    shutil.copy(run / "splits.csv", sweep / "splits.csv")
    (sweep / "best.json").write_text(json.dumps({
        "format": "lesion-sweep/best", "version": 1, "config": CFG.to_dict(),
        "metric": {"name": "val_balanced_accuracy", "value": 0.5, "mode": "max"}, "trial_id": "t1",
        "data": {"path": data.root, "fingerprint": data.fingerprint, "layout": data.layout},
        "splits_file": "splits.csv", "checkpoint": "trials/t1/best.pt",
        "code_version": {"package": "0.1.0", "git_commit": None, "git_dirty": None},
        "created": "2025-06-01T12:00:00+00:00"}))
    final_train(sweep / "best.json", FinalOptions(gallery_per_class=0, progress=False))
    image = next(Path(root).rglob("*.jpg"))
    return {"base": base, "data": Path(root), "run": run, "sweep": sweep, "final": sweep / "final", "image": image}


def cut_short(path: Path) -> None:
    """What an interrupted copy (or a full disk) leaves: the first half."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(random.Random(path.name).randbytes(max(200, min(path.stat().st_size, 3000))))


def copy_of(folder: Path, tmp_path: Path) -> Path:
    """A copy of a run or sweep folder (a sweep's final training still recognises its best.json)."""
    copy = Path(shutil.copytree(folder, tmp_path / folder.name))
    source = copy / "final" / "source.json"
    if source.is_file():
        source.write_text(json.dumps({**json.loads(source.read_text()),
                                      "best_json": str((copy / "best.json").resolve())}))
    return copy


def cli_error(main: Callable, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run a command as ``python -m`` does; it must end with exit 2 and one ``error:`` line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    assert "Traceback" not in err, err
    return errors[0]


def cli_ok(main: Callable, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    assert exit_.value.code == 0


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp"))


# --- damaged state files ----------------------------------------------------------------------------------
def test_damaged_last_pt_says_start_over_and_no_resume_does(world, tmp_path, capsys) -> None:
    run = copy_of(world["run"], tmp_path)
    argv = ["--data", str(world["data"]), "--out", str(run), *SET]
    for damage in (garbage, cut_short):
        shutil.copy(world["run"] / "last.pt", run / "last.pt")
        damage(run / "last.pt")
        err = cli_error(train_main, argv, capsys)
        assert f"{run / 'last.pt'}: damaged" in err and "--no-resume" in err
    cli_ok(train_main, [*argv, "--no-resume"])
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == CFG.epochs


def test_damaged_config_json_of_a_run(world, tmp_path, capsys) -> None:
    run = copy_of(world["run"], tmp_path)
    cut_short(run / "config.json")
    err = cli_error(train_main, ["--data", str(world["data"]), "--out", str(run), *SET], capsys)
    assert str(run / "config.json") in err and "--no-resume" in err


def test_resume_state_of_another_model_is_one_line(world, tmp_path, capsys) -> None:
    """A last.pt that reads but does not fit (here: a 3-class head) is named, not a load_state_dict traceback."""
    run = copy_of(world["run"], tmp_path)
    state = torch.load(run / "last.pt", weights_only=True)
    state["model"]["fc.weight"] = state["model"]["fc.weight"][:3]
    torch.save(state, run / "last.pt")
    err = cli_error(train_main, ["--data", str(world["data"]), "--out", str(run), *SET], capsys)
    assert str(run / "last.pt") in err and "--no-resume" in err


@pytest.mark.parametrize("name, damage", [("best.pt", cut_short), ("last.pt", garbage), ("source.json", cut_short)])
def test_damaged_file_of_a_final_training(world, tmp_path, capsys, name, damage) -> None:
    sweep = copy_of(world["sweep"], tmp_path)
    if name == "last.pt":  # an interrupted final training: run.json not complete, so it resumes
        (sweep / "final" / "run.json").unlink()
    damage(sweep / "final" / name)
    err = cli_error(final_main, [str(sweep / "best.json"), "--gallery", "0"], capsys)
    assert str(sweep / "final" / name) in err and "--no-resume" in err
    assert not (sweep / "final" / "metrics.json").exists()  # withdrawn: the folder no longer looks complete


@pytest.mark.parametrize("name, damage", [("run.json", garbage), ("metrics.csv", cut_short)])
def test_damaged_run_record_of_a_final_training_is_written_again(world, tmp_path, caplog, name, damage) -> None:
    """run.json and metrics.csv come from last.pt's history: the training resumes (nothing left to train) and
    writes them again, with a warning naming the file."""
    sweep = copy_of(world["sweep"], tmp_path)
    damage(sweep / "final" / name)
    cli_ok(final_main, [str(sweep / "best.json"), "--gallery", "0"])
    assert any(str(sweep / "final" / name) in r.message and r.levelname == "WARNING" for r in caplog.records)
    assert json.loads((sweep / "final" / "run.json").read_text())["status"] == "complete"
    assert len((sweep / "final" / "metrics.csv").read_text().splitlines()) == CFG.epochs + 1
    assert json.loads((sweep / "final" / "metrics.json").read_text())["training"]["epochs_run"] == CFG.epochs


def test_damaged_best_json_and_splits_csv(world, tmp_path, capsys) -> None:
    sweep = copy_of(world["sweep"], tmp_path)
    cut_short(sweep / "best.json")
    err = cli_error(final_main, [str(sweep / "best.json")], capsys)
    assert str(sweep / "best.json") in err and "sweep.run --resume --name sweep" in err
    shutil.copy(world["sweep"] / "best.json", sweep / "best.json")
    cut_short(sweep / "splits.csv")
    err = cli_error(final_main, [str(sweep / "best.json")], capsys)
    assert str(sweep / "splits.csv") in err and "trials/<id>/splits.csv" in err


@pytest.mark.parametrize("damage", [cut_short, garbage], ids=["cut-short", "garbage"])
def test_damaged_model_file_for_evaluate_and_predict(world, tmp_path, capsys, damage) -> None:
    model = tmp_path / "model.pt"
    shutil.copy(world["final"] / "model.pt", model)
    damage(model)
    err = cli_error(evaluate, [str(model), "--data", str(world["data"]), "--out", str(tmp_path / "eval")], capsys)
    assert f"{model}: damaged" in err
    err = cli_error(predict, [str(model), str(world["image"])], capsys)
    assert f"{model}: damaged" in err


def test_damaged_image_cache_is_rebuilt_with_a_warning(world, tmp_path, caplog) -> None:
    from core.data.dataset import load_for_config
    from core.data.image_cache import cache_file

    cache = tmp_path / "cache"
    first = load_for_config(world["data"], CFG, cache_dir=cache, progress=False)
    path = cache_file(cache, first.fingerprint, SIZE)
    for damage in (cut_short, garbage, lambda p: p.write_bytes(b""), lambda p: np.savez(open(p, "wb"), a=[1])):
        damage(path)
        caplog.clear()
        again = load_for_config(world["data"], CFG, cache_dir=cache, progress=False)
        assert (again.images == first.images).all()
        assert any("decoding again" in r.message and r.levelname == "WARNING" for r in caplog.records)
        assert (load_for_config(world["data"], CFG, cache_dir=cache, progress=False).images == first.images).all()


@pytest.mark.sweep
def test_damaged_sweep_state_stops_resume_before_ray(tmp_path, capsys) -> None:
    """optuna.db, Ray's experiment state (which Ray would skip, starting the sweep over) and sweep.json."""
    import pickle

    import optuna

    from sweep.run import main
    from sweep.settings import SweepSettings, save_settings

    results = tmp_path / "results"
    space_text = (REPO / "search_spaces" / "quick.yaml").read_text()
    settings = SweepSettings(name="s", results=str(results), space="search_spaces/quick.yaml")
    save_settings(settings, space_text, TrainConfig(), {"path": "data", "fingerprint": "0" * 40, "layout": "demo"})
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{results / 's' / 'optuna.db'}")
    for value in range(40):
        study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3 * (1 + value)}, value=value / 40,
                                                  distributions={"lr": optuna.distributions.FloatDistribution(
                                                      1e-4, 1)}))
    db = results / "s" / "optuna.db"
    intact = db.read_bytes()
    argv = ["--resume", "--name", "s", "--results", str(results)]
    for damage in (cut_short, garbage, lambda p: p.write_bytes(b"")):
        damage(db)
        err = cli_error(main, argv, capsys)
        assert str(db) in err and "another --name" in err
        db.write_bytes(intact)
    ray = results / "s" / "ray"
    ray.mkdir()
    (ray / "experiment_state-2025-01-01_00-00-00.json").write_text('{"trial_data": [')  # older: not read
    (ray / "experiment_state-2025-01-02_00-00-00.json").write_text('{"trial_data": []}')
    (ray / "tuner.pkl").write_bytes(pickle.dumps({"settings": list(range(100))}))
    for name, damage in (("tuner.pkl", cut_short), ("experiment_state-2025-01-02_00-00-00.json", cut_short)):
        damage(ray / name)
        err = cli_error(main, argv, capsys)
        assert str(ray / name) in err and "another --name" in err
    shutil.rmtree(ray)
    confirm = results / "s" / "ray-confirm"  # the confirmation stage's experiment, checked the same way
    confirm.mkdir()
    (confirm / "tuner.pkl").write_bytes(pickle.dumps({"settings": list(range(100))}))
    cut_short(confirm / "tuner.pkl")
    err = cli_error(main, argv, capsys)
    assert str(confirm / "tuner.pkl") in err and "another --name" in err
    garbage(results / "s" / "sweep.json")
    err = cli_error(main, argv, capsys)
    assert str(results / "s" / "sweep.json") in err and "another --name" in err


# --- output places ----------------------------------------------------------------------------------------
@contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], capture_output=True)  # even with a file still open


@pytest.fixture
def no_work(monkeypatch) -> None:
    """Reading a dataset or a model fails the test: an output place is checked before either."""
    import core.data.dataset
    import core.model.loading

    def work(*args, **kwargs):
        raise AssertionError("work started before the output place was checked")

    for module, name in ((core.data.dataset, "load_for_config"), (core.data.dataset, "load_dataset"),
                         (core.model.loading, "load_for_inference")):
        monkeypatch.setattr(module, name, work)


def test_output_under_a_file_fails_before_any_work(world, tmp_path, capsys, no_work) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    data = ["--data", str(world["data"])]
    for main, argv in ((train_main, [*data, "--out", str(blocker / "run"), *SET]),
                       (train_main, [*data, "--out", str(blocker), *SET]),
                       (final_main, [str(world["sweep"] / "best.json"), "--out", str(blocker / "final")]),
                       (evaluate, [str(world["final"] / "model.pt"), *data, "--out", str(blocker / "eval")]),
                       (predict, [str(world["final"] / "model.pt"), str(world["image"]), "--gradcam",
                                  str(blocker / "cams")])):
        err = cli_error(main, argv, capsys)
        assert str(blocker) in err and "not a folder" in err, err


@pytest.mark.sweep
def test_sweep_results_under_a_file(tmp_path, capsys) -> None:
    from sweep.run import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = cli_error(main, ["--space", "search_spaces/quick.yaml", "--trials", "1", "--results",
                           str(blocker / "results"), "--name", "s"], capsys)
    assert "--results/--name" in err and "not a folder" in err


def test_read_only_output_fails_before_any_work(world, tmp_path, capsys, no_work) -> None:
    with tmpfs(tmp_path / "ro", "size=1m,ro") as readonly:
        err = cli_error(train_main, ["--data", str(world["data"]), "--out", str(readonly / "run"), *SET], capsys)
        assert "read-only" in err and str(readonly / "run") in err
        err = cli_error(evaluate, [str(world["final"] / "model.pt"), "--data", str(world["data"]), "--out",
                                   str(readonly)], capsys)
        assert "read-only" in err


# --- a full disk ------------------------------------------------------------------------------------------
def _fill(folder: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free in ``folder``'s file system."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb") as handle:
        free = shutil.disk_usage(folder).free - leave
        chunk = b"\0" * (1 << 20)
        while free > 0:
            free -= handle.write(chunk[: min(len(chunk), free)])
    return filler


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(world, tmp_path, capsys, monkeypatch) -> None:
    """The disk fills after epoch 1: epoch 2's checkpoint fails with one line naming the file and the free
    space, epoch 1's stays loadable, no temporary file is left and run.json does not say complete; with
    space again the same command resumes and finishes."""
    import core.train as train_module

    sizes = {name: (world["run"] / name).stat().st_size for name in ("best.pt", "last.pt")}
    with tmpfs(tmp_path / "disk", f"size={2 * sum(sizes.values()) // 1024 + 4096}k") as disk:
        out = disk / "run"
        argv = ["--data", str(world["data"]), "--out", str(out), *SET, "--set", "epochs=3", "--threads", "1"]
        fillers = []
        real_train = train_module.train

        def fill_after_epoch_1(metrics: dict) -> None:
            if metrics["epoch"] == 1:
                fillers.append(_fill(disk, sizes["best.pt"] // 2))

        monkeypatch.setattr(train_module, "train", lambda cfg, data, out, **kw: real_train(
            cfg, data, out, fill_after_epoch_1, **kw))
        err = cli_error(train_module.main, argv, capsys)
        monkeypatch.undo()
        assert (f"{out / 'best.pt'}: cannot write it" in err or f"{out / 'last.pt'}: cannot write it" in err), err
        assert " free in " in err and "run the command again" in err
        assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
        assert json.loads((out / "run.json").read_text())["status"] == "running"
        assert temp_files(disk) == []
        for filler in fillers:
            filler.unlink()
        cli_ok(train_module.main, argv)
        assert json.loads((out / "run.json").read_text())["epochs_run"] == 3
        assert temp_files(disk) == []


def test_full_disk_in_a_final_training_leaves_no_evaluation(world, tmp_path, capsys) -> None:
    """Room for the training's checkpoints but not for model.pt: one line, no metrics.json, no temp file."""
    sizes = sum((world["final"] / name).stat().st_size for name in ("best.pt", "last.pt"))
    with tmpfs(tmp_path / "disk", f"size={sizes // 1024 + 8192}k") as disk:
        err = cli_error(final_main, [str(world["sweep"] / "best.json"), "--out", str(disk / "final"),
                                       "--gallery", "0"], capsys)
        assert f"{disk / 'final'}" in err and "cannot write it" in err and " free in " in err, err
        assert not (disk / "final" / "metrics.json").exists() and temp_files(disk) == []


@pytest.mark.sweep
def test_full_disk_leaves_no_best_json(world, tmp_path) -> None:
    from core.best_file import write_best

    best = json.loads((world["sweep"] / "best.json").read_text())
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        _fill(disk, 100)
        with pytest.raises(UserError, match="best.json: cannot write it"):
            write_best(disk / "best.json", best)
        assert not (disk / "best.json").exists() and temp_files(disk) == []


# --- SIGKILL at random moments, then the same command -------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


def _written_since(folder: Path, pattern: str, since: float) -> bool:
    """Whether this process has written a file matching ``pattern`` (searched below ``folder``)."""
    for path in folder.rglob(pattern):
        try:
            if path.stat().st_mtime >= since:
                return True
        except FileNotFoundError:  # a temporary file renamed meanwhile
            pass
    return False


def _kill_five_times(command: list[str], out: Path, moments: dict[str, tuple[str, float]], seed: int,
                     check: Callable[[], None]) -> list[str]:
    """Start ``command`` five times and SIGKILL it at a seeded random moment: a random delay (up to the
    moment's seconds) after the process writes a file matching the moment's pattern. Anchoring on what it
    wrote, not on the clock, lands the kills in the same phases however loaded the machine is (a pattern
    of ``.*.tmp`` kills it while a file is half-written). ``check`` runs after each kill."""
    rng = random.Random(seed)
    names = [*moments, *rng.choices(list(moments), k=5 - len(moments))]
    rng.shuffle(names)
    happened = []
    for name in names:
        pattern, longest = moments[name]
        since = time.time() - 0.01
        proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = since + 120
        while proc.poll() is None and time.time() < deadline and not _written_since(out, pattern, since):
            time.sleep(0.005)
        delay = rng.uniform(0, longest)
        time.sleep(delay)
        happened.append(f"{name} + {delay:.2f}s" + ("" if proc.poll() is None else " (had ended)"))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check()
    return happened


def _complete_run_is_whole(out: Path, epochs: int) -> None:
    """A run.json saying complete must be backed by the checkpoints of every epoch."""
    state = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    if state.get("status") == "complete":
        assert torch.load(out / "last.pt", weights_only=True)["epoch"] == epochs == state["epochs_run"]
        torch.load(out / "best.pt", weights_only=True)


def _complete_evaluation_is_whole(out: Path) -> None:
    """A metrics.json (written last) must be backed by the report and a readable model.pt."""
    if (out / "metrics.json").exists():
        assert (out / "report.md").is_file() and torch.load(out / "model.pt", weights_only=True)


def test_sigkilled_train_resumes_with_the_same_command(world, tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["--data", str(world["data"]), "--out", str(out), *SET, "--set", "epochs=3", "--threads", "1"]
    moments = _kill_five_times([sys.executable, "-m", "core.train", *argv], out, {
        "started": ("config.json", 1.0), "mid-write": (".*.tmp", 0.02), "an epoch saved": ("run.json", 1.0)},
        seed=0, check=lambda: _complete_run_is_whole(out, 3))
    cli_ok(train_main, argv)  # the same command (in this process: one start-up less)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    _complete_run_is_whole(out, 3)
    assert [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]] == \
        ["1.0", "2.0", "3.0"], moments
    assert temp_files(out) == [], moments


def test_sigkilled_final_training_completes_with_the_same_command(world, tmp_path) -> None:
    out = tmp_path / "final"
    argv = [str(world["sweep"] / "best.json"), "--out", str(out), "--gallery", "0", "--threads", "1"]
    moments = _kill_five_times([sys.executable, "-m", "core.final_train", *argv], out, {
        "started": ("source.json", 2.0), "mid-write": (".*.tmp", 0.02), "trained": ("run.json", 1.0)},
        seed=1, check=lambda: _complete_evaluation_is_whole(out))
    cli_ok(final_main, argv)
    assert json.loads((out / "metrics.json").read_text())["training"]["epochs_run"] == CFG.epochs, moments
    assert (out / "report.md").is_file() and temp_files(out) == [], moments
