"""``sweep.run --storage s3://...`` against a real S3-compatible server (SeaweedFS on 127.0.0.1, tests/seaweedfs.py):
the checks before any trial, one shared sweep whose trial files and outputs land in the bucket, ``--resume``
from an empty results folder, and ``core.download`` + ``core.final_train`` from the bucket."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from core.errors import UserError
from tests.seaweedfs import BUCKET, free_ports, s3  # noqa: F401  (s3: the session's server)

pytestmark = pytest.mark.sweep
SPACE = """
base: {image_size: 32, epochs: 1, warmup_epochs: 0.5, batch_size: 16, eval_batch_size: 64, pretrained: none}
params:
  lr: {dist: loguniform, low: 1.0e-3, high: 1.0e-2}
"""
DRIVER_FILES = {"sweep.json", "space.yaml", "splits.csv", "optuna.db", "confirm.json", "trials.csv", "summary.txt",
                "best.json", "report.html"}


@pytest.fixture
def s3_env(s3, monkeypatch: pytest.MonkeyPatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture(scope="module")
def inputs(module_tmp: Path) -> tuple[Path, Path]:
    from core.demo_data import generate_demo

    space = module_tmp / "space.yaml"
    space.write_text(SPACE)
    return generate_demo(module_tmp / "data", n_lesions=30, image_size=32), space


def _args(inputs: tuple[Path, Path], results: Path, name: str, storage: str, endpoint: str) -> list[str]:
    data, space = inputs
    return ["--gpus", "0", "--cpus-per-trial", "1", "--trials", "2", "--confirm-top", "1", "--confirm-seeds", "1",
            "--scheduler", "none", "--space", str(space), "--data", str(data), "--results", str(results),
            "--name", name, "--storage", storage, "--storage-endpoint", endpoint]


@pytest.fixture(scope="module")
def stored_sweep(s3, inputs, module_tmp: Path):
    """One sweep with --storage: 2 search trials and 1 confirmation run, each 1 epoch of 32 px."""
    from sweep.run import main

    env = pytest.MonkeyPatch()
    for key, value in s3.env.items():
        env.setenv(key, value)
    try:
        assert main(_args(inputs, module_tmp / "results", "stored", f"s3://{BUCKET}/sweeps", s3.endpoint)) == 0
    finally:
        env.undo()
    return module_tmp / "results" / "stored"


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


def test_trial_files_and_outputs_are_in_the_bucket(stored_sweep: Path, s3) -> None:
    stored = s3.files(f"{BUCKET}/sweeps/stored")
    assert DRIVER_FILES <= set(stored)
    rows = list(csv.DictReader(open(stored_sweep / "trials.csv")))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
    for row in rows:
        trial = f"trials/{row['trial_id']}"
        for name in ("metrics.csv", "run.json", "config.json", "splits.csv", "best.pt", "node.json", "trial.json"):
            assert f"{trial}/{name}" in stored, (trial, name)
        assert sum(1 for n in stored if n.startswith(f"{trial}/events.out.tfevents")) >= 2  # core.train's + HParams
        assert f"{trial}/last.pt" not in stored
        assert json.loads(s3.filesystem().open_input_stream(f"{BUCKET}/sweeps/stored/{trial}/run.json")
                          .read())["status"] == "complete"
        # the driver's copy of the trial came from the bucket (it never downloads models), not a worker's folder
        local = stored_sweep / trial
        assert (local / "metrics.csv").is_file() and not (local / "best.pt").exists()
    assert any(n.startswith("ray/experiment_state-") for n in stored)
    assert any(n.startswith("ray-confirm/experiment_state-") for n in stored)
    assert not any(n.endswith("/last.pt") for n in stored)  # finished trials' resume state is dropped
    assert (stored_sweep / "best.json").read_bytes() == \
        s3.filesystem().open_input_stream(f"{BUCKET}/sweeps/stored/best.json").read()


def test_a_new_sweep_refuses_a_prefix_holding_one(stored_sweep: Path, s3_env, inputs, tmp_path: Path) -> None:
    from sweep.run import main

    with pytest.raises(UserError, match=f"s3://{BUCKET}/sweeps/stored already holds a sweep: --resume"):
        main(_args(inputs, tmp_path / "elsewhere", "stored", f"s3://{BUCKET}/sweeps", s3_env.endpoint))


def test_resume_from_an_empty_results_folder(stored_sweep: Path, s3_env, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from sweep.run import main

    fresh = tmp_path / "fresh"
    assert main(["--resume", "--name", "stored", "--results", str(fresh), "--storage", f"s3://{BUCKET}/sweeps",
                 "--storage-endpoint", s3_env.endpoint]) == 0
    out = capsys.readouterr().out
    assert "sweep 'stored': 2 of 2 trials (2 completed" in out
    assert DRIVER_FILES <= {p.name for p in (fresh / "stored").iterdir()}
    assert (fresh / "stored" / "trials.csv").read_text() == (stored_sweep / "trials.csv").read_text()


def test_final_training_from_the_bucket(stored_sweep: Path, s3_env, tmp_path: Path) -> None:
    from core.download import main as download
    from core.final_train import main as final_train

    local = tmp_path / "stored"
    assert download([f"s3://{BUCKET}/sweeps/stored", str(local), "--storage-endpoint", s3_env.endpoint]) == 0
    assert (local / "best.json").is_file() and not list(local.glob("trials/*/*.pt"))
    assert final_train([str(local / "best.json"), "--epochs", "1", "--bootstrap", "20"]) == 0
    assert (local / "final" / "metrics.json").is_file()
    one = tmp_path / "one"
    assert download([f"s3://{BUCKET}/sweeps/stored/best.json", str(one), "--storage-endpoint",
                     s3_env.endpoint]) == 0
    assert (one / "best.json").read_bytes() == (local / "best.json").read_bytes()
