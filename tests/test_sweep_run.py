"""Sweeps on tiny generated data with the real core.train: outputs, failures, concurrency on logical GPUs;
what Optuna is told, the confirmation stage and warm starts.

One Ray instance (4 logical CPUs, 2 logical GPUs: the session's shared one, conftest.py) serves the whole module;
trials train on the CPU.
"""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path
from typing import Any

import optuna
import pytest

from core.errors import UserError
from sweep.run import REPO_ROOT, run_sweep
from sweep.settings import SweepSettings

QUICK = REPO_ROOT / "search_spaces" / "quick.yaml"
TINY_SPACE = """
base: {image_size: 32, epochs: 1, warmup_epochs: 0.5, batch_size: 16, eval_batch_size: 64, pretrained: none}
params:
  lr: {dist: loguniform, low: 1.0e-3, high: 1.0e-2}
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.data.demo_data import generate_demo

    return generate_demo(tmp_path_factory.mktemp("data") / "tiny", n_lesions=30, image_size=32)


@pytest.fixture(scope="module")
def ray_session(local_ray):
    """The session's shared local Ray (conftest.py: 4 logical CPUs, 2 logical GPUs)."""
    return local_ray


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
def sweep(ray_session, tiny_data: Path, module_tmp: Path) -> tuple[Path, Any, Path]:
    """One sweep serves the tests below: quick.yaml plus a 'pretrained' choice whose file is corrupt (those
    trials fail, the rest go on), on two logical GPUs at half a GPU per trial (four trials at once)."""
    tmp = module_tmp / "sweep"
    tmp.mkdir()
    broken = tmp / "broken-weights.pt"
    broken.write_bytes(b"not a state dict")
    space = tmp / "space.yaml"
    space.write_text(QUICK.read_text().replace("  pretrained: none\n", "")
                     + f"  pretrained: {{dist: categorical, choices: [none, '{broken}']}}\n")
    settings = _settings(tmp, "quick", space, tiny_data, trials=4, gpus=2, gpus_per_trial=0.5, grace_period=1,
                         seed=3, overrides=("batch_size=16", "device=cpu"), confirm_top=0)
    before = _handlers()
    report = run_sweep(settings, echo=lambda *_: None)
    HANDLERS_AROUND_SWEEP.extend([before, _handlers()])
    return tmp / "results" / "quick", report, broken


HANDLERS_AROUND_SWEEP: list[dict[int, Any]] = []


def _handlers() -> dict[int, Any]:
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}


def test_the_sweep_leaves_the_signal_handlers_as_it_found_them(sweep) -> None:
    """Ray Tune installs SIGINT and SIGUSR1 handlers for its run and leaves them; after a sweep in-process,
    Ctrl+C must interrupt the program again, not log "ending Ray Tune run"."""
    before, after = HANDLERS_AROUND_SWEEP
    assert after == before


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

    folder, report, _ = sweep
    top = _rows(folder)[0]
    best = json.loads((folder / "best.json").read_text())
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


SEARCH_SPACE = """
base: {image_size: 32, epochs: 3, warmup_epochs: 0.5, batch_size: 16, eval_batch_size: 64, pretrained: none}
params:
  lr: {dist: loguniform, low: 1.0e-3, high: 1.0e-2}
  class_weighting: {dist: categorical, choices: [none, effective]}
  effective_beta: {dist: categorical, choices: [0.9, 0.99], when: {class_weighting: effective}}
start_points: [defaults]
"""


@pytest.fixture(scope="module")
def searched(ray_session, tiny_data: Path, module_tmp: Path) -> tuple[Path, Any]:
    """6 trials of 3 epochs by val_loss (continuous: no ties), ASHA from epoch 1 keeping the better half, then the
    top 2 configs once more each. One trial at a time, so which trials ASHA stops does not depend on timing."""
    tmp = module_tmp / "searched"
    tmp.mkdir()
    space = tmp / "space.yaml"
    space.write_text(SEARCH_SPACE)
    settings = _settings(tmp, "searched", space, tiny_data, trials=6, gpus=0, cpus_per_trial=4, metric="val_loss",
                         grace_period=1, reduction_factor=2, confirm_top=2, confirm_seeds=1, seed=1,
                         overrides=("device=cpu",))
    report = run_sweep(settings, echo=lambda *_: None)
    return tmp / "results" / "searched", report


def _study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'optuna.db'}")


def _epoch_values(folder: Path, trial_id: str, metric: str) -> dict[int, float]:
    rows = list(csv.DictReader(open(folder / "trials" / trial_id / "metrics.csv", newline="")))
    return {int(float(r["epoch"])): float(r[metric]) for r in rows}


def test_optuna_is_told_what_each_trial_did(searched) -> None:
    folder, _ = searched
    trials = {t.number: t for t in _study(folder).trials}
    search = [r for r in _rows(folder) if r["role"] == "search"]
    assert len(search) == len(trials) == 6
    states = {"completed": optuna.trial.TrialState.COMPLETE, "stopped early": optuna.trial.TrialState.PRUNED}
    for row in search:
        trial = trials[int(row["optuna_trial"])]
        assert trial.user_attrs["ray_trial_id"] == row["trial_id"]
        assert trial.state == states[row["status"]], row
        epochs = _epoch_values(folder, row["trial_id"], "val_loss")
        assert sorted(epochs) == list(range(1, int(row["epochs_run"]) + 1))
        assert trial.intermediate_values == pytest.approx(epochs)  # every epoch, step = epoch
        assert trial.value == pytest.approx(float(row["val_loss_final"]))
    assert {r["status"] for r in search} == {"completed", "stopped early"}
    statuses = [r["status"] for r in search]
    assert statuses == sorted(statuses, key=["completed", "stopped early"].index)  # complete ones ranked first
    assert trials[0].params == {"lr": 1e-3, "class_weighting": "none"}  # the start point: the defaults
    assert trials[0].user_attrs["start_point"] == 1


def test_confirmation_reruns_the_top_configs_and_ranks_by_the_mean(searched) -> None:
    import statistics

    from core.best_file import read_best

    folder, report = searched
    rows = _rows(folder)
    top2 = [r["trial_id"] for r in rows if r["role"] == "search" and r["status"] == "completed"][:2]
    confirm = [r for r in rows if r["role"] == "confirm"]
    assert sorted(r["confirms"] for r in confirm) == sorted(top2) and {r["seed"] for r in confirm} == {"1"}
    assert all(r["status"] == "completed" and r["epochs_run"] == "3" for r in confirm)
    assert not list(folder.glob("ray*/*/checkpoint_*/last.pt"))  # Ray's copies of the resume state: dropped
    means = {}
    for trial_id in top2:
        values = [float(r["val_loss_final"]) for r in rows if trial_id in (r["trial_id"], r["confirms"])]
        means[trial_id] = (statistics.fmean(values), statistics.stdev(values), values)
    chosen = min(means, key=lambda t: means[t][0])
    best = json.loads((folder / "best.json").read_text())
    assert best["trial_id"] == chosen and best["metric"]["value"] == pytest.approx(means[chosen][0])
    confirmation = best["confirmation"]
    assert confirmation["values"] == pytest.approx(means[chosen][2])
    assert (confirmation["mean"], confirmation["sd"]) == pytest.approx(means[chosen][:2])
    assert [run["seed"] for run in confirmation["runs"]] == [0, 1]
    assert all((folder / run["folder"] / "best.pt").is_file() for run in confirmation["runs"])
    assert best["trial_epochs"]["budget"] == 3 and read_best(folder / "best.json").trial_epochs == 3
    assert set(best["trial_epochs"]["runs"].values()) == {3}
    assert "confirmation: the top 2 config(s)" in report.summary
    assert ("lost its place" in report.summary) == (chosen != top2[0])


def test_warm_start_adds_the_earlier_trials_and_refuses_another_space(searched, tiny_data: Path,
                                                                      tmp_path: Path) -> None:
    folder, _ = searched
    other = tmp_path / "other.yaml"
    other.write_text(SEARCH_SPACE.replace("  lr:", "  weight_decay: {dist: loguniform, low: 1.0e-5, high: 1.0e-2}\n"
                                          "  lr:"))
    with pytest.raises(UserError, match="searches 'weight_decay', which it did not"):
        run_sweep(_settings(tmp_path, "mismatch", other, tiny_data, trials=1, metric="val_loss",
                            warm_start=str(folder), overrides=("device=cpu",)), echo=lambda *_: None)
    assert not (tmp_path / "results" / "mismatch").exists()

    space = tmp_path / "space.yaml"
    space.write_text(SEARCH_SPACE)
    lines: list[str] = []
    run_sweep(_settings(tmp_path, "warm", space, tiny_data, trials=1, gpus=0, metric="val_loss", scheduler="none",
                        confirm_top=0, seed=2, warm_start=str(folder), overrides=("device=cpu",)), echo=lines.append)
    assert any(line.startswith("warm start: 6 finished trial(s)") for line in lines)
    before, after = _study(folder).trials, _study(tmp_path / "results" / "warm").trials
    assert len(after) == 7 and "warm_start_from" not in after[6].user_attrs
    for old, new in zip(before, after):
        assert new.user_attrs["warm_start_from"] == f"searched#{old.number}"
        assert (new.state, new.params, new.value) == (old.state, old.params, old.value)
        assert new.intermediate_values == old.intermediate_values
    assert after[6].params != before[0].params  # the start point is not evaluated again after a warm start
