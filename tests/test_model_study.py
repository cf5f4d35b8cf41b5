"""bench/model_study.py's verdicts: a gain within the seed-to-seed noise is reported as no gain."""

from scipy import stats

from bench.model_study import summarize, verdict


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
