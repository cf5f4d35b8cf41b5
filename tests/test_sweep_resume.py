"""A sweep whose driver is killed with SIGKILL continues with --resume: finished trials and Optuna's history are
kept, the interrupted trial continues from its last checkpoint, and the remaining trials run. Killed again
during the confirmation stage, the next --resume finishes that stage the same way."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from sweep.run import REPO_ROOT

SPACE = """
base: {image_size: 32, epochs: 4, warmup_epochs: 0.5, batch_size: 16, eval_batch_size: 64, pretrained: none}
params:
  lr: {dist: loguniform, low: 1.0e-3, high: 1.0e-2}
"""
EPOCHS = 4
TRIALS = 2


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), RAY_DEDUP_LOGS="0", TQDM_DISABLE="1")
    env.pop("RAY_ADDRESS", None)
    return env


def _records(folder: Path) -> list[dict]:
    out = []
    for path in folder.glob("trials/*/trial.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            pass
    return out


def _checkpointed_running_trial(folder: Path, role: str) -> str | None:
    """A trial of ``role`` still running that has reported (and checkpointed) an epoch but not its last one."""
    experiment = folder / ("ray" if role == "search" else "ray-confirm")
    for record in _records(folder):
        if record.get("status") != "running" or record.get("role") != role:
            continue
        metrics = folder / "trials" / record["trial_id"] / "metrics.csv"
        epochs_done = len(metrics.read_text().splitlines()) - 1 if metrics.is_file() else 0
        # ... and the driver's saved experiment state (what --resume restores from) already holds one of its
        # checkpoints: a checkpoint folder on disk is not enough, the driver may not have registered it yet.
        if 1 <= epochs_done < EPOCHS and _saved_checkpoints(experiment, record["trial_id"]):
            return record["trial_id"]
    return None


def _saved_checkpoints(experiment: Path, trial_id: str) -> list[str]:
    """Checkpoint names of ``trial_id`` in the newest experiment state Ray saved in ``experiment``."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError, KeyError):  # being written right now
        return []
    for trial, run_metadata in trials:
        if json.loads(trial).get("trial_id") == trial_id:
            return re.findall(r"checkpoint_\d+", run_metadata)
    return []


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver; then whatever it started (its process group: Ray's processes) goes too."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # only our own session's leftovers
    except ProcessLookupError:
        pass
    time.sleep(2)


def _run_and_kill(command: list[str], folder: Path, log_path: Path, ready) -> str:
    """Start ``command`` and SIGKILL it once ``ready()`` names a trial caught mid-way; returns that trial."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + 240
            interrupted = None
            while time.time() < deadline and proc.poll() is None and not interrupted:
                interrupted = ready()
                time.sleep(0.1)
            assert proc.poll() is None, "the sweep ended before it was killed: " + log_path.read_text()[-3000:]
            assert interrupted, "no trial was caught mid-way in time: " + log_path.read_text()[-3000:]
        finally:
            _kill_group(proc)
    return interrupted


def _resumed_where_it_stopped(folder: Path, trial_id: str) -> None:
    node = json.loads((folder / "trials" / trial_id / "node.json").read_text())
    assert node["resumed_from_epoch"] and 1 <= node["resumed_from_epoch"] < EPOCHS
    epochs = [line.split(",")[0] for line in (folder / "trials" / trial_id / "metrics.csv").read_text().splitlines()]
    assert epochs[1:] == [f"{e}.0" for e in range(1, EPOCHS + 1)]


def test_sigkilled_sweep_resumes(tmp_path: Path) -> None:
    from core.data.demo_data import generate_demo

    data = generate_demo(tmp_path / "data", n_lesions=30, image_size=32)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    results = tmp_path / "results"
    folder = results / "killed"
    command = [sys.executable, "-m", "sweep.run", "--gpus", "0", "--cpus-per-trial", "2", "--trials", str(TRIALS),
               "--space", str(space), "--data", str(data), "--results", str(results), "--name", "killed",
               "--scheduler", "none", "--seed", "5", "--confirm-top", "1", "--confirm-seeds", "1"]
    resume = [sys.executable, "-m", "sweep.run", "--resume", "--name", "killed", "--results", str(results)]

    def mid_search() -> str | None:
        done = [r for r in _records(folder) if r.get("status") == "completed"]
        return _checkpointed_running_trial(folder, "search") if done else None

    interrupted = _run_and_kill(command, folder, tmp_path / "first.log", mid_search)
    before = {r["trial_id"]: r for r in _records(folder)}
    finished_before = {t for t, r in before.items() if r["status"] == "completed"}
    assert finished_before and not (folder / "best.json").exists()
    from sweep.report import write_sweep_page

    assert "trial(s) running when this page was made" in write_sweep_page(folder).read_text()  # the interrupted sweep
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{folder / 'optuna.db'}")
    complete_before = {t.number: t.params for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(complete_before) >= len(finished_before)

    # Resumed, and killed again during the confirmation stage.
    confirming = _run_and_kill(resume, folder, tmp_path / "second.log",
                               lambda: _checkpointed_running_trial(folder, "confirm"))
    search = {r["trial_id"]: r for r in _records(folder) if r["role"] == "search"}
    assert len(search) == TRIALS and {r["status"] for r in search.values()} == {"completed"}
    for trial_id in finished_before:  # kept as they were, not run again
        assert search[trial_id]["ended"] == before[trial_id]["ended"]
    _resumed_where_it_stopped(folder, interrupted)
    assert (folder / "confirm.json").is_file() and not (folder / "best.json").exists()

    resumed = subprocess.run(resume, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "python -m core.final_train" in resumed.stdout
    after = {r["trial_id"]: r for r in _records(folder)}
    assert {t: r for t, r in after.items() if r["role"] == "search"} == search  # the search is not touched again
    confirm = [r for r in after.values() if r["role"] == "confirm"]
    assert [r["trial_id"] for r in confirm] == [confirming] and confirm[0]["status"] == "completed"
    _resumed_where_it_stopped(folder, confirming)

    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{folder / 'optuna.db'}")
    complete = {t.number: t.params for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(complete) == TRIALS
    assert all(complete[n] == params for n, params in complete_before.items())  # history kept
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    rows = (folder / "trials.csv").read_text().splitlines()
    assert len(rows) == TRIALS + 2
    best = json.loads((folder / "best.json").read_text())
    assert best["trial_id"] == confirm[0]["confirms"] and len(best["confirmation"]["values"]) == 2
    page = (folder / "report.html").read_text()  # rewritten by the resumed sweep
    assert "running when this page was made" not in page and all(f"trials/{t}/" in page for t in after)


@pytest.fixture(autouse=True)
def _no_ray_in_this_process():
    import ray

    assert not ray.is_initialized()
    yield


def test_a_restored_checkpoint_that_ray_already_replaced_falls_back_to_the_trials_last_pt(tmp_path: Path,
                                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Ray keeps one checkpoint per trial: a driver SIGKILLed after a newer checkpoint replaced the one its saved
    state names restores a folder that is gone. That trial must go on from its own last.pt, not fail."""
    from sweep.trainable import EPOCH_FILE, restore_checkpoint

    out = tmp_path / "trials" / "t1"
    out.mkdir(parents=True)
    (out / "last.pt").write_bytes(b"epoch 3 state")
    assert restore_checkpoint(tmp_path / "ray" / "t1" / "checkpoint_000001", out) is None
    assert (out / "last.pt").read_bytes() == b"epoch 3 state" and "is gone" in caplog.text
    saved = tmp_path / "ray" / "t1" / "checkpoint_000002"
    saved.mkdir(parents=True)
    (saved / "last.pt").write_bytes(b"epoch 4 state")
    (saved / EPOCH_FILE).write_text(json.dumps({"epoch": 4.0, "val_balanced_accuracy": 0.5}))
    assert restore_checkpoint(saved, out) == 4 and (out / "last.pt").read_bytes() == b"epoch 4 state"
