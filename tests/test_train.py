"""The training function end to end on small generated data (CPU)."""

import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import core.training.loop as loop_module
import core.train as train_module
from core.config import TrainConfig
from core.data.dataset import load_dataset
from core.data.demo_data import generate_demo
from core.errors import UserError
from core.model.networks import load_model_file
from core.device import memory_format
from core.model.inference import predict_probs
from core.train import RunOptions, TrainingDiverged, train
from tests.paths import REPO

SIZE = 32


QUIET = RunOptions(progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Enough lesions (160) for six epochs to learn well above chance: the tests that assert learning."""
    root = generate_demo(tmp_path_factory.mktemp("demo") / "data", n_lesions=160, image_size=SIZE, seed=1)
    return load_dataset(root, SIZE, progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """48 lesions (every class, still imbalanced), for the tests of mechanics (resume, checkpoints, EMA,
    compile, errors, the command): what they assert does not depend on the data's size, and on 160 lesions
    they took 265 s of a 28-minute suite run (a loaded machine, 2026-12-03)."""
    root = generate_demo(tmp_path_factory.mktemp("small") / "data", n_lesions=48, image_size=SIZE, seed=1)
    return load_dataset(root, SIZE, progress=False)


def _cfg(**kw):
    base = dict(image_size=SIZE, epochs=6, batch_size=32, lr=2e-3, warmup_epochs=1.0, pretrained="none",
                crop_scale_min=0.8, color_jitter=0.05, eval_batch_size=128)
    return TrainConfig(**{**base, **kw})


def test_short_run_learns_and_writes_its_outputs(demo, tmp_path):
    seen = []
    before = time.time()
    result = train(_cfg(), demo, tmp_path, on_epoch=seen.append, options=RunOptions(progress=False))
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4, 5, 6]
    chance = 1 / len(demo.class_names)
    assert result.best_metrics["val_balanced_accuracy"] > 2.5 * chance, result.best_metrics
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    for name in ("config.json", "splits.csv", "metrics.csv", "run.json", "best.pt", "last.pt"):
        assert (tmp_path / name).is_file(), name
    assert TrainConfig.load(tmp_path / "config.json") == _cfg()
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert len(rows) == 6 and {"train_loss", "val_loss", "val_balanced_accuracy", "val_auc"} <= set(rows.columns)
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["status"] == "complete" and summary["best_epoch"] == result.best_epoch
    assert before < summary["first_step_unix_time"] < time.time() - sum(m["train_epoch_s"] for m in seen[1:])
    assert list(tmp_path.glob("events.out.tfevents.*"))
    model, meta = load_model_file(tmp_path / "best.pt")
    assert meta["class_names"] == list(demo.class_names) and meta["epoch"] == result.best_epoch
    val = demo.indices("val")
    probs = predict_probs(model, demo.images[val])
    acc = float((probs.argmax(1) == demo.labels[val]).mean())
    assert acc == pytest.approx(result.best_metrics["val_accuracy"], abs=1e-6)



def test_bf16_channels_last_path_learns(demo, tmp_path):
    """The step that CUDA runs (bf16 autocast, channels_last), here on the CPU: it trains and evaluates."""
    result = train(_cfg(precision="bf16"), demo, tmp_path, options=QUIET)
    assert result.best_metrics["val_balanced_accuracy"] > 2.5 / len(demo.class_names), result.best_metrics
    assert np.isfinite(result.history[-1]["val_loss"])


def test_compiled_model_trains_evaluates_and_saves_plain_weights(small, tmp_path, monkeypatch):
    """compile=True (meant for long GPU runs), traced by Dynamo with the eager backend: inductor's C++
    build takes minutes on this CPU and is torch's own business, how train() uses the compiled module is ours."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))
    result = train(_cfg(compile=True, epochs=2), small, tmp_path, options=QUIET)
    assert result.epochs_run == 2 and np.isfinite(result.history[-1]["val_loss"])
    model, _ = load_model_file(tmp_path / "best.pt")  # a strict load: keys with '_orig_mod.' would fail it
    probs = predict_probs(model, small.images[small.indices("val")])
    acc = float((probs.argmax(1) == small.labels[small.indices("val")]).mean())
    assert acc == pytest.approx(result.best_metrics["val_accuracy"], abs=1e-6)


@pytest.mark.parametrize("device, bf16, channels_last, expected", [
    ("cuda", False, True, torch.channels_last), ("cuda", True, True, torch.channels_last),
    ("cpu", True, True, torch.channels_last), ("cpu", False, True, torch.contiguous_format),
    ("cuda", True, False, torch.contiguous_format)])
def test_channels_last_where_it_is_fast(device, bf16, channels_last, expected):
    assert memory_format(channels_last, torch.device(device), bf16) == expected


@pytest.mark.parametrize("extra", [{}, {"sampling": "balanced", "ema_decay": 0.99}], ids=["plain", "ema+balanced"])
def test_resume_continues_where_a_crash_stopped(small, tmp_path, extra):
    cfg = _cfg(epochs=3, **extra)
    full = train(cfg, small, tmp_path / "full", options=QUIET)

    def crash(metrics):
        if metrics["epoch"] == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, small, tmp_path / "crashed", on_epoch=crash, options=QUIET)
    resumed_epochs = []
    resumed = train(cfg, small, tmp_path / "crashed", on_epoch=resumed_epochs.append, options=QUIET)
    assert [m["epoch"] for m in resumed_epochs] == [3]
    assert resumed.epochs_run == 3
    for key in ("train_loss", "val_loss", "val_balanced_accuracy"):
        assert resumed.history[-1][key] == pytest.approx(full.history[-1][key], rel=1e-4, abs=1e-5), key


def test_checkpoint_interval_writes_at_the_end_and_keeps_the_best_epoch(small, tmp_path, monkeypatch):
    """With an interval longer than the run, nothing is written until the last epoch; then best.pt
    holds the best epoch's weights (kept on the device meanwhile), not the last epoch's."""
    scores = iter([0.5, 0.9, 0.6, 0.7])  # epoch 2 is the best by val_balanced_accuracy
    real = train_module.classification_metrics
    monkeypatch.setattr(train_module, "classification_metrics",
                        lambda *a, **kw: {**real(*a, **kw), "val_balanced_accuracy": next(scores)})
    written = []
    result = train(_cfg(epochs=4, lr=2e-2), small, tmp_path, on_epoch=lambda m: written.append(
        ((tmp_path / "last.pt").exists(), (tmp_path / "best.pt").exists())),
        options=RunOptions(progress=False, tensorboard=False, checkpoint_every_s=1e9))
    assert written == [(False, False)] * 3 + [(True, True)]
    model, meta = load_model_file(tmp_path / "best.pt")
    assert result.best_epoch == 2 and meta["epoch"] == 2 and meta["metrics"] == result.history[1]
    val = small.indices("val")
    acc = float((predict_probs(model, small.images[val]).argmax(1) == small.labels[val]).mean())
    assert acc == pytest.approx(result.best_metrics["val_accuracy"], abs=1e-6)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 4


def test_resume_refuses_another_config(small, tmp_path):
    train(_cfg(epochs=1), small, tmp_path, options=QUIET)
    with pytest.raises(UserError, match="'lr' differs"):
        train(_cfg(epochs=1, lr=1e-2), small, tmp_path, options=QUIET)


def test_nan_loss_stops_with_a_clear_error(small, tmp_path, monkeypatch):
    real = loop_module.augment_batch
    monkeypatch.setattr(loop_module, "augment_batch", lambda x, cfg, g: real(x, cfg, g) * float("nan"))
    with pytest.raises(TrainingDiverged, match="diverged.*lower the learning rate"):
        train(_cfg(epochs=2), small, tmp_path, options=QUIET)
    assert not (tmp_path / "best.pt").exists()


def test_class_weighting_changes_the_loss(small, tmp_path):
    a = train(_cfg(epochs=1), small, tmp_path / "a", options=QUIET)
    b = train(_cfg(epochs=1, class_weighting="inverse"), small, tmp_path / "b", options=QUIET)
    assert a.history[0]["train_loss"] != pytest.approx(b.history[0]["train_loss"])


def test_cli_end_to_end(small, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "core.train", "--data", small.root, "--out", str(out),
           "--set", f"image_size={SIZE}", "--set", "epochs=1", "--set", "pretrained=none", "--set", "batch_size=32"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val_balanced_accuracy=" in proc.stdout
    assert json.loads((out / "run.json").read_text())["epochs_run"] == 1
    bad = subprocess.run([sys.executable, "-m", "core.train", "--data", str(tmp_path / "nowhere"), "--out",
                          str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nowhere" in bad.stderr


def test_ema_weights_are_validated_and_saved(small, tmp_path, monkeypatch):
    """With ema_decay, best.pt holds the EMA (here: the last epoch's, made the best) and val is its score."""
    scores = iter([0.1, 0.2])
    real = train_module.classification_metrics
    monkeypatch.setattr(train_module, "classification_metrics",
                        lambda *a, **kw: {**real(*a, **kw), "val_balanced_accuracy": next(scores)})
    result = train(_cfg(epochs=2, ema_decay=0.9), small, tmp_path, options=QUIET)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    model, meta = load_model_file(tmp_path / "best.pt")
    assert meta["epoch"] == result.best_epoch == 2
    saved = model.state_dict()
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert not all(torch.equal(saved[k], state["model"][k]) for k in saved if saved[k].is_floating_point())
    val = small.indices("val")
    acc = float((predict_probs(model, small.images[val]).argmax(1) == small.labels[val]).mean())
    assert acc == pytest.approx(result.history[-1]["val_accuracy"], abs=1e-6)
