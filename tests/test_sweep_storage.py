"""``sweep.run --storage s3://...`` against a real S3-compatible server (SeaweedFS on 127.0.0.1, tests/seaweedfs.py):
the checks before any trial; one shared sweep that meets a storage fault mid-sweep (the server is stopped while
its trials run), stops with one line, and is finished by ``--resume`` from an empty results folder once the
server is back; its trial files and outputs in the bucket; ``--resume`` without ``--name``; and
``core.final_train`` of the bucket's best.json, its final/ uploaded beside the sweep."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.errors import UserError
from sweep.run import REPO_ROOT
from tests.seaweedfs import BUCKET, free_ports, s3  # noqa: F401  (s3: the session's server)

pytestmark = pytest.mark.sweep
# mobilenet_v3_large: the smallest backbone (22 MB against resnet18's 45 MB): the storage is what is tested, and
# every epoch uploads best.pt and Ray's checkpoint (last.pt, about 3x the model).
SPACE = """
base: {arch: mobilenet_v3_large, image_size: 32, epochs: 2, warmup_epochs: 0.5, batch_size: 16, eval_batch_size: 64,
       pretrained: none}
params:
  lr: {dist: loguniform, low: 1.0e-3, high: 1.0e-2}
"""
DRIVER_FILES = {"sweep.json", "space.yaml", "splits.csv", "optuna.db", "confirm.json", "trials.csv", "summary.txt",
                "best.json", "report.html"}
PREFIX = f"s3://{BUCKET}/sweeps"


@pytest.fixture
def s3_env(s3, monkeypatch: pytest.MonkeyPatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture(scope="module")
def inputs(module_tmp: Path) -> tuple[Path, Path]:
    from core.data.demo_data import generate_demo

    space = module_tmp / "space.yaml"
    space.write_text(SPACE)
    return generate_demo(module_tmp / "data", n_lesions=30, image_size=32), space


def _args(inputs: tuple[Path, Path], results: Path, name: str, storage: str, endpoint: str) -> list[str]:
    data, space = inputs
    return ["--gpus", "0", "--cpus-per-trial", "1", "--trials", "1", "--confirm-top", "1", "--confirm-seeds", "1",
            "--scheduler", "none", "--space", str(space), "--data", str(data), "--results", str(results),
            "--name", name, "--storage", storage, "--storage-endpoint", endpoint]


@dataclass(frozen=True)
class StoredSweep:
    folder: Path                            # results/stored of the driver that finished it (--resume)
    faulted: subprocess.CompletedProcess    # the first driver, stopped by the storage fault
    resumed: str                            # what the --resume driver printed


@pytest.fixture(scope="module")
def stored_sweep(s3, inputs, module_tmp: Path) -> StoredSweep:
    """One sweep with --storage (1 search trial and 1 confirmation run, each 2 epochs of 32 px): SeaweedFS is
    stopped as soon as the trial has uploaded its first epoch; once the first driver has stopped it is started again
    (same data, same ports) and ``--resume`` (no --name: the prefix holds this sweep only) finishes the sweep from
    an empty results folder."""
    from sweep.run import main

    env = dict(os.environ, **s3.env, PYTHONPATH=str(REPO_ROOT), TQDM_DISABLE="1", RAY_USAGE_STATS_ENABLED="0")
    driver = subprocess.Popen([sys.executable, "-m", "sweep.run",
                               *_args(inputs, module_tmp / "first", "stored", PREFIX, s3.endpoint)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while driver.poll() is None and not any(n.endswith("/metrics.csv") for n in s3.files(f"{BUCKET}/sweeps/stored")):
            time.sleep(0.1)
        s3.stop()  # the trial is between its first epoch and its last
        out, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
        if s3.process is None:
            s3.start()
    monkey = pytest.MonkeyPatch()
    for key, value in s3.env.items():
        monkey.setenv(key, value)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert main(["--resume", "--results", str(module_tmp / "results"), "--storage", PREFIX,
                         "--storage-endpoint", s3.endpoint]) == 0
    finally:
        monkey.undo()
    return StoredSweep(module_tmp / "results" / "stored",
                       subprocess.CompletedProcess(driver.args, driver.returncode, out, err), printed.getvalue())


def test_storage_problems_stop_before_any_trial(s3_env, inputs, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from sweep.run import main

    def error(storage: str, endpoint: str = s3_env.endpoint) -> str:
        with pytest.raises(UserError) as caught:
            main(_args(inputs, tmp_path / "results", "bad", storage, endpoint))
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "the bucket 'no-such-bucket' does not exist" in error("s3://no-such-bucket/sweeps")
    down = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert f"cannot reach the endpoint {down}" in error(f"s3://{BUCKET}/sweeps", down)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert "access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in error(f"s3://{BUCKET}/sweeps")
    assert "expected s3://bucket" in error("gs://bucket/x")
    assert not (tmp_path / "results" / "bad" / "sweep.json").exists()  # nothing was started


def test_a_storage_fault_mid_sweep_stops_it_with_one_line(stored_sweep: StoredSweep) -> None:
    faulted = stored_sweep.faulted
    assert faulted.returncode == 2, faulted.stderr[-3000:]
    errors = [line for line in faulted.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and faulted.stderr.rstrip().endswith(errors[0]), faulted.stderr[-3000:]
    assert errors[0].startswith(f"error: {PREFIX}/stored: ")
    assert errors[0].endswith(f"the sweep stopped: once the storage is back, python -m sweep.run --resume --name "
                              f"stored --storage {PREFIX} continues it")
    # No traceback from the driver (Ray's "Trial task failed" is one line for a storage failure). Lines that Ray
    # forwards from its worker processes, "(run_trial pid=...) ...", are theirs: a worker that Ray's shutdown
    # kills may print Python's "Exception ignored in ..." with a traceback of its SIGTERM handler.
    own = [line for line in faulted.stderr.splitlines() if not line.lstrip("\x1b[0123456789m").startswith("(")]
    assert not [line for line in own if line.startswith("Traceback")], faulted.stderr[-3000:]


def test_trial_files_and_outputs_are_in_the_bucket(stored_sweep: StoredSweep, s3) -> None:
    stored = s3.files(f"{BUCKET}/sweeps/stored")
    assert DRIVER_FILES <= set(stored)
    rows = list(csv.DictReader(open(stored_sweep.folder / "trials.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}  # the faulted trial too
    for row in rows:
        trial = f"trials/{row['trial_id']}"
        for name in ("metrics.csv", "run.json", "config.json", "splits.csv", "best.pt", "node.json", "trial.json"):
            assert f"{trial}/{name}" in stored, (trial, name)
        assert sum(1 for n in stored if n.startswith(f"{trial}/events.out.tfevents")) >= 2  # core.train's + HParams
        assert f"{trial}/last.pt" not in stored
        assert json.loads(s3.filesystem().open_input_stream(f"{BUCKET}/sweeps/stored/{trial}/run.json")
                          .read())["status"] == "complete"
        # the driver's copy of the trial came from the bucket (it never downloads models), not a worker's folder
        local = stored_sweep.folder / trial
        assert (local / "metrics.csv").is_file() and not (local / "best.pt").exists()
    assert any(n.startswith("ray/experiment_state-") for n in stored)
    assert any(n.startswith("ray-confirm/experiment_state-") for n in stored)
    assert not any(n.endswith("/last.pt") for n in stored)  # finished trials' resume state is dropped
    assert (stored_sweep.folder / "best.json").read_bytes() == \
        s3.filesystem().open_input_stream(f"{BUCKET}/sweeps/stored/best.json").read()


def test_a_new_sweep_refuses_a_prefix_holding_one(stored_sweep: StoredSweep, s3_env, inputs, tmp_path: Path) -> None:
    from sweep.run import main

    with pytest.raises(UserError, match=f"{PREFIX}/stored already holds a sweep: --resume"):
        main(_args(inputs, tmp_path / "elsewhere", "stored", PREFIX, s3_env.endpoint))


def test_resume_finished_it_from_an_empty_results_folder(stored_sweep: StoredSweep) -> None:
    assert "sweep 'stored': 1 of 1 trials (1 completed, 0 stopped early, 0 failed)" in stored_sweep.resumed
    assert DRIVER_FILES <= {p.name for p in stored_sweep.folder.iterdir()}


def test_resume_without_name_needs_exactly_one_sweep(s3_env, tmp_path: Path) -> None:
    from sweep.run import main

    fs = s3_env.filesystem()
    for name in ("one", "two"):
        with fs.open_output_stream(f"{BUCKET}/several/{name}/sweep.json") as f:
            f.write(b"{}")
    with fs.open_output_stream(f"{BUCKET}/several/notes/readme.txt") as f:  # a folder that is not a sweep
        f.write(b"x")

    def error(prefix: str) -> str:
        with pytest.raises(UserError) as caught:
            main(["--resume", "--results", str(tmp_path), "--storage", prefix, "--storage-endpoint",
                  s3_env.endpoint])
        return str(caught.value)

    assert error(f"s3://{BUCKET}/several") == \
        f"--resume --storage s3://{BUCKET}/several: it holds 2 sweeps (one, two); give --name"
    assert error(f"s3://{BUCKET}/nothing-here") == \
        f"--resume --storage s3://{BUCKET}/nothing-here: it holds no sweep; give --name"


def test_final_training_of_the_buckets_best_json(stored_sweep: StoredSweep, s3_env, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from core.download import main as download
    from core.final_train import main as final_train

    sweep = f"{PREFIX}/stored"
    assert final_train([f"{sweep}/best.json", "--storage-endpoint", s3_env.endpoint, "--epochs", "1",
                        "--bootstrap", "20", "--gallery", "0"]) == 0
    assert f"report: {sweep}/final/report.md" in capsys.readouterr().out
    final = s3_env.files(f"{BUCKET}/sweeps/stored/final")
    assert {"model.pt", "metrics.json", "report.md", "report.html", "run.json", "metrics.csv"} <= set(final)
    assert "last.pt" not in final
    page = s3_env.filesystem().open_input_stream(f"{BUCKET}/sweeps/stored/report.html").read().decode()
    assert (stored_sweep.folder / "report.html").read_text() != page  # the sweep's page gained the final model
    # what core.download brings (the models stay unless asked for) is what a local final training reads
    local = tmp_path / "stored"
    assert download([sweep, str(local), "--storage-endpoint", s3_env.endpoint]) == 0
    assert (local / "best.json").is_file() and not list(local.glob("trials/*/*.pt"))
    assert json.loads((local / "final" / "metrics.json").read_text())["n_images"] > 0
    one = tmp_path / "one"
    assert download([f"{sweep}/best.json", str(one), "--storage-endpoint", s3_env.endpoint]) == 0
    assert (one / "best.json").read_bytes() == (local / "best.json").read_bytes()


def test_final_training_upload_puts_the_marker_last(s3_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A half-finished upload must not look complete: an older final/ goes first, metrics.json comes last."""
    from core.final_storage import upload_final
    from core.io.storage import Store, open_store

    out = tmp_path / "final"
    out.mkdir()
    for name in ("model.pt", "report.md", "metrics.json", "last.pt"):
        (out / name).write_text(name)
    sweep = open_store(f"s3://{BUCKET}/marker/sweep", s3_env.endpoint)
    sweep.child("final").upload_file(out / "report.md", "stale.txt")  # an earlier final/'s file
    sent, upload = [], Store.upload_file
    monkeypatch.setattr(Store, "upload_file", lambda self, local, rel: sent.append(f"{self.uri}/{rel}")
                        or upload(self, local, rel))
    upload_final(out, sweep, tmp_path)
    assert sent[-1] == f"{sweep.uri}/final/metrics.json"
    assert set(s3_env.files(f"{BUCKET}/marker/sweep/final")) == {"model.pt", "report.md", "metrics.json"}


STORAGE_ERRORS = ("StorageError: s3://b/p/s: cannot upload trials/a/best.pt: cannot reach the endpoint http://h:1 (is "
                  "the server running? the endpoint is --storage-endpoint URL)",
                  "OSError: When uploading part for key 'p/s/ray/a/checkpoint_000001/last.pt' in bucket 'b': AWS "
                  "Error NETWORK_CONNECTION during UploadPart operation: curlCode: 7, Couldn't connect to server")


def test_resume_reruns_only_the_trials_that_storage_failed(tmp_path: Path) -> None:
    """Which errored trials --resume trains again (Ray reschedules them all: resume_errored) and which fail again at
    once with their recorded error (TrialSetup.failed), and whose resume state the recorder keeps for that."""
    from sweep.outputs import write_trial
    from sweep.recorder import TrialRecorder, TrialTerms, error_message
    from sweep.run import _failed_for_good
    from sweep.trainable import FailedBefore

    recorder = TrialRecorder(tmp_path, ["lr"], TrialTerms("val_balanced_accuracy", "max", 2, 0))
    errors = {"done": None, "net": STORAGE_ERRORS[0], "ray": STORAGE_ERRORS[1], "bug": "ValueError: lr must be > 0"}
    for trial_id, error in errors.items():
        write_trial(tmp_path, {"trial_id": trial_id, "params": {"lr": 0.1}, "started": 1.0})
        (tmp_path / "trials" / trial_id / "last.pt").write_bytes(b"resume state")
        recorder.finished(trial_id, {"lr": 0.1}, {"epoch": 1}, error)
    write_trial(tmp_path, {"trial_id": "cut", "params": {"lr": 0.1}, "status": "running"})  # its end never recorded
    assert _failed_for_good(tmp_path) == {"bug": "ValueError: lr must be > 0"}
    assert {t for t in errors if (tmp_path / "trials" / t / "last.pt").exists()} == {"net", "ray"}
    # the trial that failed for itself, failing again at once, keeps its first error as its record says
    assert error_message(FailedBefore("ValueError: lr must be > 0")) == "ValueError: lr must be > 0"


def test_a_trial_that_storage_failed_stops_the_sweep(s3_env, tmp_path: Path) -> None:
    """Even where the driver reaches the storage again (a short outage, or only a worker's network failed): a sweep
    that went on would end its search without the trial; stopped, its --resume trains it on."""
    from core.io.storage import StorageError, open_store
    from sweep.outputs import write_trial
    from sweep.recorder import TrialRecorder, TrialTerms
    from sweep.storage import SweepStorage

    remote = SweepStorage(open_store(f"s3://{BUCKET}/stops", s3_env.endpoint))
    recorder = TrialRecorder(tmp_path, ["lr"], TrialTerms("val_balanced_accuracy", "max", 2, 0), remote=remote)
    write_trial(tmp_path, {"trial_id": "net", "params": {"lr": 0.1}, "started": 1.0})
    (tmp_path / "trials" / "net" / "last.pt").write_bytes(b"resume state")
    with pytest.raises(StorageError, match="trial net failed on the storage .StorageError: s3://b/p/s: cannot upload"):
        recorder.finished("net", {"lr": 0.1}, {"epoch": 1}, STORAGE_ERRORS[0])
    assert remote.failure is not None and (tmp_path / "trials" / "net" / "last.pt").exists()
    assert json.loads(remote.store.read_bytes("trials/net/trial.json"))["status"] == "failed"  # recorded first


@pytest.fixture
def one_ray(monkeypatch: pytest.MonkeyPatch):
    """One local Ray for the sweeps of a test (a sweep started where Ray runs uses it, and leaves it running)."""
    import ray

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_resume_does_not_train_a_trial_that_failed_for_itself(inputs, one_ray, tmp_path: Path) -> None:
    """Ray reschedules every errored trial on --resume (resume_errored, for those the storage failed); one that
    failed for itself fails again at once with its recorded error. Its weights file changes in between here, so a
    trial that really ran again would fail with another error (or none)."""
    import torch

    from sweep.outputs import read_trials
    from sweep.run import main

    data, _ = inputs
    weights = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for path in weights:
        path.write_bytes(b"not a state dict")
    space = tmp_path / "space.yaml"
    space.write_text("base: {arch: mobilenet_v3_large, image_size: 32, epochs: 1, batch_size: 16}\nparams:\n"
                     f"  pretrained: {{dist: categorical, choices: ['{weights[0]}', '{weights[1]}']}}\n")
    args = ["--results", str(tmp_path / "results"), "--name", "broken"]
    assert main(["--gpus", "0", "--cpus-per-trial", "1", "--trials", "1", "--confirm-top", "0", "--scheduler", "none",
                 "--space", str(space), "--data", str(data), *args]) == 1  # no trial finished: no best.json
    [first] = read_trials(tmp_path / "results" / "broken")
    assert first["status"] == "failed" and "UserError" in first["error"]
    for path in weights:
        torch.save([1], path)  # another fault: "not a state_dict"
    # as if the driver had been killed as the search ended (confirm.json marks that end; a resume past it never
    # restores the search's Ray experiment)
    (tmp_path / "results" / "broken" / "confirm.json").unlink()
    assert main(["--resume", *args]) == 1
    [again] = read_trials(tmp_path / "results" / "broken")
    assert again["status"] == "failed" and again["error"] == first["error"]
    assert again["ended"] > first["ended"]  # Ray did run it again (and it failed at once)
