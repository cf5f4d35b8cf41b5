"""One training run: fine-tune a backbone (ResNet-18 by default, config key ``arch``) on a dataset and report validation metrics per epoch.

    python -m core.train --data ../shared/data/ham10000-200x150 --out results/one-run \
        --set image_size=64 --set epochs=5 --set pretrained=none

Writes ``config.json``, ``splits.csv``, ``metrics.csv`` (a row per epoch), ``run.json`` (the run's state),
``best.pt`` (the model file of the best epoch by ``select_metric``), ``last.pt`` (resume state) and
TensorBoard scalars into ``--out`` (core/training/run_writer.py). Running the same command again resumes from
``last.pt``.

The whole decoded dataset lives in memory (on the GPU when there is one); batches are gathered by
index and augmented on the device (core/training/loop.py), so no JPEG is read and no DataLoader worker runs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from core.model.box_head import start_capture
from core.config import TrainConfig
from core.device import Placement, as_tensor, dataset_to_device, resolve_device
from core.training.ema import make_ema
from core.errors import UserError, run_cli
from core.metric_names import SELECT_METRICS
from core.training.loop import Batches, Optimisation, train_one_epoch
from core.model.forward import predict_split
from core.model.fields import encode_dataset, make_spec
from core.evaluation.metrics import classification_metrics
from core.model.networks import build_model
from core.training.optim import make_criterion, make_optimizer, make_scheduler
from core.progress import progress_bar
from core.training.run_writer import RunWriter
from core.io.state_files import check_output_dir
from core.training.sampling import epoch_order, image_draw_weights

if TYPE_CHECKING:
    from core.data.dataset import Dataset

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, float]], None]


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out, as opposed to what it trains (that is the TrainConfig)."""

    resume: bool = True                          # continue from last.pt when the folder holds this config's run
    tensorboard: bool = True                     # write TensorBoard scalars beside the other outputs
    progress: bool = True                        # a progress bar over each epoch's steps
    train_splits: tuple[str, ...] = ("train",)   # ("train", "val") trains on both (val no longer held out)
    checkpoint_every_s: float = 0.0              # write best.pt/last.pt at most this often (0: every epoch)
    keep_last: bool = False                      # best.pt holds the last epoch, not the best by select_metric


@dataclass(frozen=True)
class TrainResult:
    best_metrics: dict[str, float]
    last_metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]]
    out_dir: Path


def train(cfg: TrainConfig, data: "Dataset", out_dir: str | os.PathLike, on_epoch: EpochCallback | None = None,
          options: RunOptions = RunOptions()) -> TrainResult:
    """Train for ``cfg.epochs`` epochs; ``on_epoch(metrics)`` runs after each epoch (and its checkpoint).

    On a GPU an epoch can take less time than writing the checkpoints, so long runs pass an interval
    (``options.checkpoint_every_s``); a resume then repeats at most that much training.
    """
    writer = RunWriter(Path(out_dir), cfg, data, options)
    device = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    batches = _batches(cfg, data, options.train_splits, device)
    val_idx = data.indices("val")

    model = build_model(len(data.class_names), cfg.pretrained, cfg.arch, batches.fusion,
                        box_head=batches.masks is not None)
    model = model.to(device, memory_format=batches.placement.memory_format)
    optimizer = make_optimizer(model, cfg)
    ema = make_ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    scheduler = make_scheduler(optimizer, cfg, batches.steps_per_epoch)
    start_epoch = writer.restore(model, optimizer, scheduler, ema)
    step_model = torch.compile(model) if cfg.compile else model
    # the box head's output of each training step (core/model/box_head.py), its hook registered once for the run
    boxes, box_hook = start_capture(model) if batches.masks is not None else (None, None)
    opt = Optimisation(step_model, optimizer, scheduler, make_criterion(cfg, _train_counts(data, batches), device), ema,
                       boxes)
    # The EMA, when there is one, is the model that is validated and saved.
    evaluated, saved = (ema.module, ema.module) if ema is not None else (step_model, model)
    draw_weights = image_draw_weights(batches.labels[batches.train_idx], cfg.sampling)

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        # A generator per epoch, seeded from (seed, epoch): a resumed run draws what the uninterrupted one would.
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed * 1_000_003 + epoch)
        order = epoch_order(len(batches.train_idx), draw_weights, gen)
        writer.epoch_started()
        with _progress(batches.steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", options.progress) as bar:
            train_stats = train_one_epoch(opt, batches, order, cfg, gen, bar)
            if not math.isfinite(train_stats["train_loss"]):
                raise TrainingDiverged(f"training diverged: the training loss is {train_stats['train_loss']} in "
                                       f"epoch {epoch} (lr={cfg.lr}); lower the learning rate")
            val_probs, val_loss = predict_split(evaluated, batches.images, val_idx, batches.labels,
                                                batches.placement, cfg.eval_batch_size, batches.clinical)
            metrics = {"epoch": float(epoch), "lr": float(scheduler.get_last_lr()[0]), **train_stats,
                       **classification_metrics(data.labels[val_idx], val_probs, "val_", val_loss)}
            bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", val_bacc=f"{metrics['val_balanced_accuracy']:.3f}")
        writer.epoch_done(metrics, saved, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                               "scheduler": scheduler.state_dict(),
                                               **({"ema": ema.state_dict()} if ema is not None else {})},
                          val_probs)
        if on_epoch is not None:
            on_epoch(metrics)
    if box_hook is not None:
        box_hook.remove()
    writer.close()
    history = writer.history
    return TrainResult(best_metrics=history[writer.best_epoch - 1], last_metrics=history[-1],
                       best_epoch=writer.best_epoch, epochs_run=len(history), history=history, out_dir=writer.out)


def _batches(cfg: TrainConfig, data: "Dataset", train_splits: tuple[str, ...], device: torch.device) -> Batches:
    train_idx = np.concatenate([data.indices(s) for s in train_splits])
    n_val = len(data.indices("val"))
    if len(train_idx) == 0 or n_val == 0:
        raise UserError(f"{data.root}: the split has {len(train_idx)} training and {n_val} validation "
                        f"images; both must be non-empty (more data or other val_fraction/test_fraction)")
    spec = make_spec(cfg.metadata)
    clinical = None if spec is None else torch.as_tensor(encode_dataset(data, spec), device=device)
    images, labels = dataset_to_device(data, device)
    batch_size = min(cfg.batch_size, len(train_idx))
    masks, has_mask = box_masks(cfg, data, device)
    return Batches(images=images, labels=labels, train_idx=torch.as_tensor(train_idx, device=device),
                   batch_size=batch_size, steps_per_epoch=len(train_idx) // batch_size,
                   placement=Placement.of(device, cfg.precision, cfg.channels_last), clinical=clinical,
                   fusion=spec, masks=masks, has_mask=has_mask)


def box_masks(cfg: TrainConfig, data: "Dataset", device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The lesion masks (beside the images) and which images have one, for the box head; (None, None) without a
    box head, or (with a warning) for a dataset without masks, which then trains without one."""
    if cfg.box_loss_weight <= 0:
        return None, None
    if data.masks is None:
        log.warning("box_loss_weight=%g but %s has no lesion masks: training without the box head",
                    cfg.box_loss_weight, data.root)
        return None, None
    images = as_tensor(data.masks)
    masks = images.to(device) if device.type == "cuda" else images
    return masks, torch.as_tensor(np.asarray(data.has_mask), dtype=torch.bool, device=device)


def _train_counts(data: "Dataset", batches: Batches) -> np.ndarray:
    return np.bincount(data.labels[batches.train_idx.cpu().numpy()], minlength=len(data.class_names))


def _progress(total: int, desc: str, enabled: bool):
    return progress_bar(total=total, desc=desc, unit="step", enabled=enabled, leave=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a backbone (config key arch, default ResNet-18) on a skin-lesion dataset (one run, no sweep).",
        epilog="config keys (--set key=value):\n" + TrainConfig.describe())
    parser.add_argument("--data", help="dataset folder (HAM10000, ISIC 2018 Task 3 or ImageFolder layout); "
                                       "default: the built-in synthetic demo dataset")
    parser.add_argument("--out", required=True, help="output folder of the run")
    parser.add_argument("--config", help="a config.json to start from (then --set applies on top)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; repeatable")
    parser.add_argument("--splits", help="reuse the split of an earlier run (its splits.csv)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    check_output_dir(args.out, "--out")

    cfg = (TrainConfig.load(args.config) if args.config else TrainConfig()).with_overrides(args.overrides)
    from core.data.dataset import load_for_config  # after the config: a bad key fails before any data work

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_for_config(args.data, cfg, splits_file=args.splits, masks=cfg.box_loss_weight > 0)  # the box head's
    result = train(cfg, data, args.out, options=RunOptions(resume=not args.no_resume))
    best = result.best_metrics
    print(f"best epoch {result.best_epoch}/{result.epochs_run}: "
          + ", ".join(f"{k}={best[k]:.4f}" for k in SELECT_METRICS))
    print(f"outputs in {result.out_dir} (run.json, metrics.csv, best.pt); tensorboard --logdir {result.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
