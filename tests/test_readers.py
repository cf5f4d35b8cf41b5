"""The typed readers of a model file's header (core/model/model_header.py) and of metrics.json
(core/evaluation/evaluation_file.py)."""

from __future__ import annotations

import json
from pathlib import Path

from core.evaluation.evaluation_file import (SourceData, SweepMetric, TrainingRecord, figures_of, read_evaluation_figures,
                                             source_data_of, training_of)
from core.model.model_header import header_of


def test_the_header_of_a_single_model_and_of_an_ensemble() -> None:
    single = header_of({"arch": "resnet50", "class_names": ["a", "b"], "config": {"image_size": 64, "epochs": 9},
                        "epoch": 7, "calibration": {"fitted_on": "val", "temperature": {"single": 1.5, "tta": None}},
                        "metadata": {"width": 3}})
    assert single.arch == "resnet50" and single.class_names == ("a", "b") and single.image_size == 64
    assert single.epoch == 7 and single.epochs == 9 and single.temperature["single"] == 1.5
    assert single.has_clinical_fields and not single.is_ensemble
    ensemble = header_of({"class_names": ["a"], "image_size": 32, "calibration": {"skipped": "no val"},
                          "members": [{"name": "t1", "weight": 0.75}, {"name": "t2", "weight": 0.25}]})
    assert ensemble.arch == "resnet18" and ensemble.temperature is None and ensemble.not_calibrated == "no val"
    assert ensemble.is_ensemble and [m.name for m in ensemble.members] == ["t1", "t2"]


TRAINING = TrainingRecord("/r/sweep/best.json", "t3", SweepMetric("val_balanced_accuracy", 0.58, "max"), 5, 5,
                          ("train", "val"), {"train": 700, "val": 150, "test": 120}, 5, "last epoch", 5,
                          {"val_loss": 0.9}, "cpu", 42.0)


def test_metrics_json_sections_written_and_read_as_dataclasses() -> None:
    document = json.loads(json.dumps({"training": TRAINING.to_dict(),
                                      "source": {"data": SourceData("/d", "isic", "0" * 64, ("a", "b")).to_dict()}}))
    assert training_of(document) == TRAINING and TRAINING.trained_on_val
    assert source_data_of(document) == SourceData("/d", "isic", "0" * 64, ("a", "b"))
    # core.evaluate's document has no training; a foreign or cut section reads as absent, not as a crash
    partial = {"training": {"split_sizes": {"test": 1}}, "source": {"data": {"path": "/d"}}}
    assert training_of({}) is None and training_of(partial) is None and source_data_of(partial) is None
    assert figures_of(partial).split_sizes is None and figures_of(partial).data.name is None


def test_metrics_json_read_back_without_the_data_path(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({
        "format": "lesion-sweep/evaluation", "test_balanced_accuracy": 0.61, "test_auc": 0.9, "n_images": 120,
        "intervals": {"test_balanced_accuracy": {"low": 0.55, "high": 0.67}},
        "source": {"split": "test", "data": SourceData("/srv/secret/ham10000", "ham10000", "f" * 64,
                                                       tuple("abcdefg")).to_dict()},
        "training": TRAINING.to_dict()}))
    figures = read_evaluation_figures(path)
    assert figures.balanced_accuracy == 0.61 and figures.balanced_accuracy_ci["low"] == 0.55
    assert figures.accuracy is None and figures.split == "test" and figures.epochs_run == 5
    assert figures.data.name == "ham10000" and figures.data.classes == 7
    assert "/srv/secret" not in json.dumps(figures.to_dict())
    path.write_text("{not json")
    assert read_evaluation_figures(path) is None and read_evaluation_figures(tmp_path / "absent.json") is None
