"""A 2-trial sweep over search_spaces/models.yaml (arch, metadata, mixup/CutMix) on tiny demo data, with the
real core.train in Ray trials (the space's base shrunk with --set: 32 px, 1 epoch, no pretrained weights), on the
session's shared local Ray (conftest.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sweep.run import REPO_ROOT, run_sweep
from sweep.settings import SweepSettings

pytestmark = pytest.mark.sweep
MODELS = REPO_ROOT / "search_spaces" / "models.yaml"


def test_two_trials_over_the_models_space(local_ray, tmp_path: Path) -> None:
    from core.data.demo_data import generate_demo

    data = generate_demo(tmp_path / "data", n_lesions=24, image_size=32)
    settings = SweepSettings(
        name="models", results=str(tmp_path / "results"), space=str(MODELS), data=str(data), trials=2, gpus=0,
        cpus_per_trial=1, scheduler="none", confirm_top=0, seed=1,
        overrides=("image_size=32", "epochs=1", "warmup_epochs=0", "pretrained=none", "batch_size=16",
                   "eval_batch_size=64", "device=cpu"))
    run_sweep(settings, echo=lambda *_: None)
    with open(tmp_path / "results" / "models" / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(row["status"] == "completed" for row in rows), rows
    start = next(row for row in rows if row["optuna_trial"] == "0")  # rows are best first
    assert start["arch"] == "resnet18" and start["metadata"] == "none"   # the start point: the defaults
    for row in rows:
        lrs = [row[name] for name in ("lr", "lr@convnext", "lr@mobile") if row[name] != ""]  # the arch's range only
        assert row["arch"] and row["metadata"] in ("none", "concat", "film") and len(lrs) == 1 and float(lrs[0]) > 0
        assert (row["metadata_dropout"] == "") == (row["metadata"] == "none")  # sampled only with metadata
    best = json.loads((tmp_path / "results" / "models" / "best.json").read_text())
    chosen = next(row for row in rows if row["trial_id"] == best["trial_id"])
    assert best["config"]["lr"] == pytest.approx(float(next(v for k, v in chosen.items() if k.startswith("lr") and v)))
