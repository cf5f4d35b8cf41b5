"""The benchmark scripts run end to end on tiny generated data and write every figure they promise.

Smoke tests, not timings: the figures themselves are measured by running the scripts (bench/README.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from bench.model_study import summarize, verdict
from bench import final_fidelity, hpo_efficacy, report_size, sweep_overhead, train_throughput
from core.data.demo_data import generate_demo
from core.filenames import REPORT_HTML


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("bench") / "demo", n_lesions=20, image_size=32)


def test_train_throughput_measures_three_pipelines(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    code = train_throughput.main(["--data", str(tiny_data), "--device", "cpu", "--image-size", "32",
                                  "--batch-size", "8", "--steps", "2", "--warmup", "1", "--repeats", "1",
                                  "--workers", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["data"]["source"] == "generated" and result["data"]["images"] > 16
    assert result["settings"]["image_size"] == 32 and result["settings"]["batch_size"] == 8
    assert len(result["rounds"]) == 1
    for name in ("usual", "project", "compute"):
        assert all(r[name]["images_per_s"] > 0 for r in result["rounds"]), name
        assert result[f"{name}_images_per_s"] > 0
        assert result["gpu_utilization_pct"][name] is None  # on the CPU there is nothing to sample
    assert result["ratio"] > 0 and math.isfinite(result["project_below_compute_pct"])
    assert result["machine"]["cpus"] >= 1 and result["command"].startswith("python")


@pytest.mark.sweep
def test_sweep_overhead_reads_a_real_sweep(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    code = sweep_overhead.main(["--data", str(tiny_data), "--gpus", "0", "--trials", "2", "--max-epochs", "1",
                                "--batch-size", "8", "--results", str(tmp_path / "sweeps"), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["data"]["source"] == "generated"
    (run,) = result["runs"]
    assert run["trials"] == 2 and run["statuses"] == {"completed": 2}
    assert run["slots"] >= 1 and 1 <= run["max_concurrency"] <= run["slots"]
    assert 0 < run["trials_train_s"] < run["trials_duration_s"] < 2 * run["wall_s"]
    assert 0 < run["mean_concurrency"] <= run["mean_concurrency_while_trials_ran"] <= run["max_concurrency"]
    assert 0 < run["first_trial_start_s"] < run["first_step_after_s"] < run["wall_s"]
    assert run["trials_per_hour"] > 0  # its arithmetic: test_sweep_figures_arithmetic
    assert run["gpu_utilization_pct"] is None


@pytest.mark.sweep
def test_hpo_efficacy_scores_the_chosen_configs_on_test(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "efficacy.json"
    code = hpo_efficacy.main(["--data", str(tiny_data), "--epochs", "1", "--budget", "2", "--seeds", "3",
                              "--methods", "default", "tpe-asha-confirm", "--confirm-top", "1", "--confirm-seeds", "1",
                              "--results", str(tmp_path / "sweeps"), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    default, confirmed = result["runs"]
    assert (default["method"], confirmed["method"]) == ("default", "tpe-asha-confirm")
    # (d)'s search stops starting trials at its 1-epoch budget (2 - 1 confirmation epoch); a trial already
    # running beside the first finishes. Then 1 confirmation run of the chosen config.
    searched = confirmed["optuna_states"]["COMPLETE"]
    assert result["settings"]["plans"]["tpe-asha-confirm"]["budget"] == 1
    assert default["trial_epochs"] == 1 and confirmed["trial_epochs"] == searched + 1
    assert 1 <= searched <= result["settings"]["plans"]["tpe-asha-confirm"]["trials"]
    assert len(confirmed["per_run"]) == 2 and set(confirmed["optuna_states"]) == {"COMPLETE"}
    for run in (default, confirmed):  # the arithmetic of the figures: test_hpo_efficacy_summary_arithmetic
        assert 0 <= run["test_balanced_accuracy"] <= 1 and -1 <= run["drop"] <= 1
    assert set(result["summary"]) == {"default", "tpe-asha-confirm"}
    # A budget that leaves (d) no search trial beside its confirmation runs is refused before anything runs.
    with pytest.raises(SystemExit) as refused:
        hpo_efficacy.main(["--data", str(tiny_data), "--epochs", "2", "--budget", "4", "--confirm-top", "2"])
    assert refused.value.code == 2


def test_train_throughput_summary_arithmetic() -> None:
    """Three rounds of made-up speeds: the medians, the ratio and the shortfall by hand."""
    costs = {part: {"cpu": 1.0, "wall": 1.0} for part in ("usual_data", "project_data", "compute_step")}
    rounds = [{"usual": {"images_per_s": u, "gpu_utilization_pct": None},
               "project": {"images_per_s": p, "gpu_utilization_pct": None},
               "compute": {"images_per_s": c, "gpu_utilization_pct": None}, "cost_ms_per_image": costs}
              for u, p, c in ((80.0, 100.0, 120.0), (90.0, 90.0, 100.0), (100.0, 110.0, 125.0))]
    summary = train_throughput._summary(rounds)
    assert (summary["usual_images_per_s"], summary["project_images_per_s"], summary["compute_images_per_s"]) == \
        (90.0, 100.0, 120.0)
    assert summary["ratio"] == pytest.approx(1.111, abs=1e-3)             # 100 / 90
    assert summary["project_below_compute_pct"] == pytest.approx(16.67)   # 1 - 100 / 120
    assert summary["usual_data_share_pct"] == {"cpu": 50.0, "wall": 50.0}


def test_hpo_efficacy_summary_arithmetic() -> None:
    """Two seeds of two methods: means, sds and the gain paired by seed, by hand."""
    def run(method: str, seed: int, test: float) -> dict:
        return {"method": method, "seed": seed, "trials": 4, "trial_epochs": 8, "val": 0.6,
                "test_balanced_accuracy": test, "drop": 0.6 - test, "test_accuracy": 0.7, "wall_s": 10.0}

    runs = [run("default", 0, 0.40), run("default", 1, 0.50), run("random", 0, 0.46), run("random", 1, 0.52)]
    summary = hpo_efficacy.summarise(runs)
    assert summary["random"]["test_balanced_accuracy"]["mean"] == pytest.approx(0.49)
    assert summary["default"]["drop"]["mean"] == pytest.approx(0.15)
    gain = summary["random"]["test_gain_over"]["default"]
    assert gain["mean"] == pytest.approx(0.04) and gain["n"] == 2      # (0.06 + 0.02) / 2
    assert gain["sd"] == pytest.approx(0.02 * 2 ** 0.5)                 # sd of 0.06 and 0.02
    assert set(summary) == {"default", "random"}


def test_sweep_figures_arithmetic(tmp_path: Path) -> None:
    """Two trials overlapping for 5 s in a 20 s sweep with 2 slots: the figures by hand."""
    sweep = tmp_path / "sweep"
    for trial_id, start, end, epoch_s in (("a", 100.0, 110.0, [3.0, 3.0]), ("b", 105.0, 115.0, [4.0])):
        folder = sweep / "trials" / trial_id
        folder.mkdir(parents=True)
        (folder / "trial.json").write_text(json.dumps(
            {"trial_id": trial_id, "started": start, "ended": end, "duration_s": end - start - 1,
             "status": "completed"}))
        (folder / "metrics.csv").write_text("epoch,train_epoch_s\n" + "".join(
            f"{i + 1},{s}\n" for i, s in enumerate(epoch_s)))
    (sweep / "trials" / "a" / "run.json").write_text(json.dumps({"first_step_unix_time": 102.5}))
    figures, span = sweep_overhead.sweep_figures(sweep, started=95.0, ended=115.0, slots=2)
    assert span == (100.0, 115.0)
    assert figures["wall_s"] == 20.0 and figures["trials"] == 2
    assert figures["trials_train_s"] == 10.0 and figures["trials_duration_s"] == 18.0
    assert figures["slot_efficiency"] == 0.25                       # 10 s of training / (20 s x 2 slots)
    assert figures["mean_concurrency"] == 1.0                       # 20 trial-seconds in 20 s
    assert figures["mean_concurrency_while_trials_ran"] == round(20 / 15, 2)
    assert figures["max_concurrency"] == 2
    assert figures["first_trial_start_s"] == 5.0
    assert figures["first_step_after_s"] == 7.5
    assert math.isclose(figures["trials_per_hour"], 360.0)


@pytest.mark.sweep
def test_final_fidelity_scores_trial_and_final_model_on_test(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "fidelity.json"
    code = final_fidelity.main(["--data", str(tiny_data), "--short-epochs", "1", "--long-epochs", "2", "--budget", "2",
                                "--seeds", "5", "--ema-horizon-epochs", "4", "--results", str(tmp_path / "runs"),
                                "--set", "image_size=24", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    short, long, ema = result["runs"]
    assert [r["method"] for r in result["runs"]] == ["short", "long", "long-ema"]
    # Each sweep stops starting trials at the 2-epoch budget; the trials already running finish.
    plans = result["settings"]["plans"]
    assert plans["short"]["trials"] == 4 and plans["long"]["trials"] == 2
    for run in result["runs"]:
        epochs = plans[run["method"]]["trial_epochs"]
        assert 2 <= run["trial_epochs"] < 2 + 2 * epochs and 1 <= run["trials"] <= plans[run["method"]]["trials"]
    # Every final training lasts the long length; only (a)'s, tuned with 1-epoch trials, is warned about.
    assert [r["final_epochs"] for r in result["runs"]] == [2, 2, 2]
    assert "tuned with 1-epoch trials and is retrained for 2 epochs" in short["mismatch_warning"]
    assert long["mismatch_warning"] is None and ema["mismatch_warning"] is None
    decay = result["settings"]["ema_decay"]
    assert 0 < decay < 1
    for run in result["runs"]:
        config = json.loads((Path(run["final_dir"]) / "config.json").read_text())
        assert config["ema_decay"] == (decay if run["method"] == "long-ema" else 0.0)
        assert config["seed"] == 5 and config["image_size"] == 24  # --set reaches every trial and retrain
        # The final model's test score here is the one final_train itself wrote in metrics.json.
        assert run["final"]["test_balanced_accuracy"] == pytest.approx(run["final_metrics_json_test_balanced_accuracy"])
    assert set(result["summary"]) == {"short", "long", "long-ema"}
    assert len(result["targets"]) == 5
    # --resume on the same folder reads the finished sweep and final training again: the same figures.
    again = tmp_path / "again.json"
    assert final_fidelity.main(["--data", str(tiny_data), "--short-epochs", "1", "--long-epochs", "2", "--budget", "2",
                                "--seeds", "5", "--methods", "long", "--resume", "--results", str(tmp_path / "runs"),
                                "--set", "image_size=24",
                                "--out", str(again)]) == 0
    (resumed,) = json.loads(again.read_text())["runs"]
    for key in ("trial", "final", "final_epochs", "chosen_trial", "trial_epochs"):
        assert resumed[key] == long[key], key


def test_val_swing_is_the_mean_absolute_epoch_to_epoch_change() -> None:
    assert final_fidelity.val_swing([0.5, 0.6, 0.4, 0.4]) == pytest.approx((0.1 + 0.2 + 0.0) / 3)
    assert math.isnan(final_fidelity.val_swing([0.5]))


def test_report_size_bench_measures_a_generated_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """bench.report_size end to end, sizes only (no browser: the browser test covers loading)."""
    monkeypatch.setenv("CHROMIUM", "no-such-browser")
    out = tmp_path / "size.json"
    assert report_size.main(["--trials", "6", "--epochs", "3", "--repeats", "1", "--keep", str(tmp_path),
                             "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    page = doc["pages"][0]
    assert doc["browser"] is None and page["trials"] >= 6 and "rendered_ms" not in page
    assert page["bytes"] == (tmp_path / "generated-6" / REPORT_HTML).stat().st_size
    assert page["parts"]["plotly.js"] > 1e6 and {"facts", "curves", "trials", "final"} <= set(page["parts"])
    assert "| generated-6 |" in capsys.readouterr().out


# bench/model_study.py's verdicts: a gain within the seed-to-seed noise is reported as no gain.
def test_a_gain_counts_only_outside_the_seed_noise() -> None:
    assert verdict([0.02, 0.03, 0.025], stats) == "gain"
    assert verdict([-0.02, -0.03, -0.025], stats) == "loss"
    assert verdict([0.05, -0.01, 0.02], stats) == "no difference (within seed noise)"  # mean +0.02, sd 0.03
    assert verdict([0.05], stats).startswith("n/a")


def test_differences_are_paired_by_seed() -> None:
    def run(variant, seed, bacc):
        return {"variant": variant, "seed": seed, "test_balanced_accuracy": bacc, "test_auc": 0.8,
                "train_images_per_s": 100.0, "test_balanced_accuracy_ci": [0, 1], "test_auc_ci": [0, 1]}

    # the variant is worse than the baseline on average over seeds, but better on every seed: paired, a gain
    runs = [run("resnet18", 0, 0.30), run("resnet18", 1, 0.50), run("resnet18", 2, 0.40),
            run("x", 0, 0.31), run("x", 1, 0.51), run("x", 2, 0.41)]
    summary = summarize(runs, ["resnet18", "x"])
    diff = summary["x"]["test_balanced_accuracy_diff"]
    assert diff["per_seed"] == [0.31 - 0.30, 0.51 - 0.50, 0.41 - 0.40] and diff["verdict"] == "gain"
    assert summary["x"]["test_auc_diff"]["verdict"] == "no difference (within seed noise)"
    assert "test_balanced_accuracy_diff" not in summary["resnet18"]


# bench/box_study.py: the issue's targets from the runs' figures, paired by seed; one seed is not judged.
def test_box_study_targets_met_or_missed() -> None:
    from bench import box_study

    def run(weight, seed, bacc, head_iou, cam_iou):
        scores = lambda iou: {"mean_iou": iou, "iou_0.3": 1.0, "iou_0.5": iou, "iou_0.7": iou - 0.2}  # noqa: E731
        boxes = {"gradcam": scores(cam_iou), "centre_prior": scores(0.5), "whole_image": scores(0.37)}
        if weight:
            boxes["head"] = scores(head_iou)
        return {"box_loss_weight": weight, "seed": seed, "test_balanced_accuracy": bacc, "test_auc": 0.8,
                "localisation": {"boxes": boxes, "max_box_acc": {"max_box_acc": 0.6, "max_box_acc_v2": 0.5}}}

    runs = [run(0.0, s, b, None, 0.55) for s, b in ((0, 0.40), (1, 0.42), (2, 0.41))]
    runs += [run(1.0, s, b, 0.9, 0.45) for s, b in ((0, 0.20), (1, 0.22), (2, 0.21))]
    found = box_study.targets(box_study.summarize(runs))
    head = "head (box_loss_weight 1)"
    assert found[f"{head}: head mean_iou >= 0.8"]["met"] and not found[f"{head}: head iou_0.7 >= 0.75"]["met"]
    assert found[f"{head}: balanced accuracy not lower than without the head"]["met"] is False   # a paired loss
    assert found["Grad-CAM box ahead of the centre prior (no head)"]["met"]
    assert not found[f"Grad-CAM box ahead of the centre prior ({head})"]["met"]
    one_seed = box_study.targets(box_study.summarize([runs[0], runs[3]]))
    assert one_seed[f"{head}: balanced accuracy not lower than without the head"]["met"] is None
    assert "| no head | gradcam |" in box_study.table(box_study.summarize(runs))


# bench/ood_study.py: per set, the mean over seeds and the best score by FPR@95; abstention's gain per seed.
def test_ood_study_summary_names_the_best_score_and_the_gain() -> None:
    from bench.ood_study import ROWS, SCORES, summarize, table

    def run(seed: int, fpr: float) -> dict:
        scores = {row: {s: {"auroc": 0.9, "fpr_at_95": fpr * (i + 1)} for i, s in enumerate(SCORES)} for row in ROWS}
        return {"seed": seed, "counts": {row: 10 for row in ROWS}, "scores": scores, "aurc": 0.2,
                "balanced_accuracy": {"all": 0.40, "surest_90": 0.40 + 0.01 * (seed + 1)}, "rule": {"coverage": 0.9}}

    summary = summarize([run(0, 0.02), run(1, 0.04)])
    assert summary["rows"]["far_out"]["best"] == "mahalanobis"
    assert summary["rows"]["far_out"]["energy"]["fpr_at_95"]["mean"] == pytest.approx(0.09)
    assert summary["abstention"]["gain_at_90"]["per_seed"] == pytest.approx([0.01, 0.02])
    assert "| far_out | 10 |" in table(summary) and "+0.015" in table(summary)


def test_work_folder_keeps_a_given_folder_and_removes_its_own_even_after_an_error(tmp_path: Path) -> None:
    from bench.common import work_folder

    with work_folder(str(tmp_path / "runs"), "unused-") as given:
        given.mkdir()
    assert given == (tmp_path / "runs").resolve() and given.is_dir()
    with pytest.raises(KeyboardInterrupt):
        with work_folder(None, "bench-test-") as own:
            (own / "run").mkdir()
            raise KeyboardInterrupt  # a study stopped with Ctrl-C
    assert own.name.startswith("bench-test-") and not own.exists()
