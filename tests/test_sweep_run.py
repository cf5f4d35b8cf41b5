"""Sweeps on tiny generated data with the real core.train: outputs, failures, concurrency on logical GPUs.

One Ray instance (4 logical CPUs, 2 logical GPUs) serves the whole module; trials train on the CPU.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import optuna
import pytest

from core.errors import UserError
from sweep.run import REPO_ROOT, SweepSettings, run_sweep

QUICK = REPO_ROOT / "search_spaces" / "quick.yaml"
TINY_SPACE = """
base: {image_size: 32, epochs: 1, warmup_epochs: 0.5, batch_size: 16, eval_batch_size: 64, pretrained: none}
params:
  lr: {dist: loguniform, low: 1.0e-3, high: 1.0e-2}
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.demo_data import generate_demo

    return generate_demo(tmp_path_factory.mktemp("data") / "tiny", n_lesions=30, image_size=32)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _settings(tmp_path: Path, name: str, space: Path, data: Path, **kw) -> SweepSettings:
    return SweepSettings(name=name, results=str(tmp_path / "results"), space=str(space), data=str(data), **kw)


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def _session_groups(logdir: Path) -> dict[str, tuple[dict, dict, list]]:
    """What TensorBoard's HParams dashboard shows: per session, its hparams, metric values and status."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=mux,
                               data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)))
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=1000,
        allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE,
                          api_pb2.STATUS_RUNNING])
    groups = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request).run()
    out = {}
    for group in groups.session_groups:
        params = {k: v.string_value or v.number_value or v.bool_value for k, v in group.hparams.items()}
        metrics = {m.name.tag: m.value for m in group.metric_values}
        out[group.name] = (params, metrics, [s.status for s in group.sessions])
    return out


@pytest.fixture(scope="module")
def sweep(ray_session, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Path]:
    """One sweep serves the tests below: quick.yaml plus a 'pretrained' choice whose file is corrupt (those
    trials fail, the rest go on), on two logical GPUs at half a GPU per trial (four trials at once)."""
    tmp = tmp_path_factory.mktemp("sweep")
    broken = tmp / "broken-weights.pt"
    broken.write_bytes(b"not a state dict")
    space = tmp / "space.yaml"
    space.write_text(QUICK.read_text().replace("  pretrained: none\n", "")
                     + f"  pretrained: {{dist: categorical, choices: [none, '{broken}']}}\n")
    settings = _settings(tmp, "quick", space, tiny_data, trials=4, gpus=2, gpus_per_trial=0.5, grace_period=1,
                         seed=3, overrides=("batch_size=16", "device=cpu"))
    report = run_sweep(settings, echo=lambda *_: None)
    return tmp / "results" / "quick", report, broken


def test_trials_csv_has_a_row_per_trial_and_failures_with_their_error(sweep) -> None:
    folder, report, broken = sweep
    rows = _rows(folder)
    assert len(rows) == 4
    failed = [r for r in rows if r["status"] == "failed"]
    ran = [r for r in rows if r["status"] in ("completed", "stopped early")]
    assert failed and ran and len(failed) + len(ran) == 4, rows
    for row in failed:
        assert row["pretrained"] == str(broken) and str(broken) in row["error"] and "UserError" in row["error"]
        assert not row["val_balanced_accuracy_final"]
    for row in ran:
        assert row["pretrained"] == "none" and row["val_balanced_accuracy_final"] and not row["error"]
        assert row["lr"] and row["class_weighting"] and 1 <= int(row["epochs_run"]) <= 2
        assert float(row["duration_s"]) > 0
    assert rows[0] in ran  # best first
    assert not list(folder.glob("trials/*/last.pt"))  # resume state dropped once a trial ended
    study = optuna.load_study(study_name="quick", storage=f"sqlite:///{folder / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert len(states) == 4 and states.count(optuna.trial.TrialState.FAIL) == len(failed)


def test_best_json_is_accepted_by_the_final_training_loader(sweep, tiny_data: Path) -> None:
    from core.best_file import check_data
    from core.best_file import read_best as core_read_best
    from sweep.best_file import read_best

    folder, report, _ = sweep
    top = _rows(folder)[0]
    best = read_best(folder / "best.json")
    assert best == report.best
    assert best["trial_id"] == top["trial_id"]
    assert best["metric"] == {"name": "val_balanced_accuracy", "mode": "max",
                              "value": pytest.approx(float(top["val_balanced_accuracy_final"]))}
    assert best["config"]["lr"] == pytest.approx(float(top["lr"]))
    assert best["config"]["image_size"] == 32 and best["config"]["batch_size"] == 16
    assert best["config"]["pretrained"] == "none" and best["config"]["device"] == "cpu"
    loaded = core_read_best(folder / "best.json")  # what core.final_train reads
    check_data(loaded)
    assert loaded.splits_file == folder / "splits.csv" and loaded.checkpoint.is_file()
    assert loaded.data_path == tiny_data.resolve()
    assert "python -m core.final_train" in report.summary and "top 5" in report.summary
    assert (folder / "summary.txt").read_text().strip() == report.summary.strip()


def test_the_sweep_writes_its_page(sweep) -> None:
    folder, _, _ = sweep
    page = (folder / "report.html").read_text(encoding="utf-8")
    rows = _rows(folder)
    failed = sum(r["status"] == "failed" for r in rows)
    assert f"{failed} failed; 0 confirmation run(s)" in page
    assert all(f'href="trials/{r["trial_id"]}/"' in page for r in rows) and 'id="fig-curves"' in page


def test_tensorboard_shows_every_trial_in_the_hparams_dashboard(sweep) -> None:
    from tensorboard.plugins.hparams import api_pb2

    folder, _, _ = sweep
    rows = _rows(folder)
    groups = _session_groups(folder)
    assert set(groups) == {r["trial_id"] for r in rows}
    for row in rows:
        params, metrics, statuses = groups[row["trial_id"]]
        assert params["pretrained"] == row["pretrained"] and params["lr"] == pytest.approx(float(row["lr"]))
        assert metrics["sweep/epochs_run"] == float(row["epochs_run"])
        if row["status"] == "failed":
            assert statuses == [api_pb2.STATUS_FAILURE]
        else:
            assert statuses == [api_pb2.STATUS_SUCCESS] and "val_loss" in metrics
            assert metrics["sweep/val_balanced_accuracy_final"] == pytest.approx(
                float(row["val_balanced_accuracy_final"]))
    # core.train's curves live in the trial folders only: Ray's own TensorBoard logger is off (no duplicates).
    assert all("trials" in p.relative_to(folder).parts for p in folder.rglob("events.out.tfevents.*"))


def test_trials_share_logical_gpus_and_run_at_once(sweep) -> None:
    folder, _, _ = sweep
    records = [json.loads(p.read_text()) for p in folder.glob("trials/*/trial.json")]
    assert len(records) == 4
    gpu_ids = [r["node"]["gpu_ids"] for r in records]
    assert all(len(ids) == 1 for ids in gpu_ids)
    assert sorted(ids[0] for ids in gpu_ids) == ["0", "0", "1", "1"]  # two trials on each GPU
    assert all(r["node"]["cuda_visible_devices"] == r["node"]["gpu_ids"][0] for r in records)
    assert all(r["node"]["torch_threads"] == 1 for r in records)  # 4 logical CPUs / 4 slots
    # Four slots (2 GPUs / 0.5): Ray started all four trials before the first one ended.
    assert max(r["started"] for r in records) < min(r["ended"] for r in records)


def test_more_gpus_than_there_are_fails_before_starting(ray_session, tiny_data: Path, tmp_path: Path) -> None:
    settings = _settings(tmp_path, "toomany", QUICK, tiny_data, trials=2, gpus=4)
    with pytest.raises(UserError, match="--gpus 4: this machine has 2 GPU"):
        run_sweep(settings, echo=lambda *_: None)
    assert not (tmp_path / "results" / "toomany" / "sweep.json").exists()
