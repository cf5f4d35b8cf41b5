"""One training run: fine-tune ResNet-18 on a dataset and report validation metrics per epoch.

    python -m core.train --data ../shared/data/ham10000-200x150 --out results/one-run \
        --set image_size=64 --set epochs=5 --set pretrained=none

Writes ``config.json``, ``splits.csv``, ``metrics.csv`` (a row per epoch), ``metrics.json``,
``best.pt`` (the model file of the best epoch by ``select_metric``), ``last.pt`` (resume state) and
TensorBoard scalars into ``--out``. Running the same command again resumes from ``last.pt``.

The whole decoded dataset lives in memory (on the GPU when there is one); batches are gathered by
index and augmented on the device, so no JPEG is read and no DataLoader worker runs during training.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import nn

from core import atomic
from core.augment import augment_batch, normalize
from core.class_weights import class_weights
from core.config import TrainConfig
from core.errors import UserError, run_cli
from core.metrics import classification_metrics
from core.model import build_model, save_model_file

if TYPE_CHECKING:
    from core.data import Dataset

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, float]], None]


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainResult:
    best_metrics: dict[str, float]
    last_metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]]
    out_dir: Path


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("config key 'device' = 'cuda': no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def memory_format(channels_last: bool, device: torch.device, bf16: bool) -> torch.memory_format:
    """channels_last where it is fast: on CUDA, and on the CPU with bf16, where oneDNN's bf16 convolutions
    want it (fp32 on the CPU gains nothing from it)."""
    return torch.channels_last if channels_last and (device.type == "cuda" or bf16) else torch.contiguous_format


def train(cfg: TrainConfig, data: "Dataset", out_dir: str | os.PathLike,
          on_epoch: EpochCallback | None = None, *, resume: bool = True, tensorboard: bool = True,
          progress: bool = True, train_splits: tuple[str, ...] = ("train",),
          checkpoint_every_s: float = 0.0) -> TrainResult:
    """Train for ``cfg.epochs`` epochs; ``on_epoch(metrics)`` runs after each epoch (and its checkpoint).

    ``best.pt`` and ``last.pt`` are written after the last epoch and after every epoch that ends at least
    ``checkpoint_every_s`` seconds after the previous write (0: every epoch). On a GPU an epoch can take
    less time than writing the two files, so long runs pass an interval; a resume then repeats at most
    that much training.
    """
    from core.data import write_splits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_run(out, cfg, resume)
    device = resolve_device(cfg)
    bf16 = use_bf16(cfg.precision, device)
    layout = memory_format(cfg.channels_last, device, bf16)
    torch.manual_seed(cfg.seed)

    atomic.write_text(out / "config.json", cfg.to_json())
    write_splits(data, out / "splits.csv")

    train_idx = np.concatenate([data.indices(s) for s in train_splits])
    val_idx = data.indices("val")
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise UserError(f"{data.root}: the split has {len(train_idx)} training and {len(val_idx)} validation "
                        f"images; both must be non-empty (more data or other val_fraction/test_fraction)")
    num_classes = len(data.class_names)

    images, labels = dataset_to_device(data, device)
    train_idx_d = torch.as_tensor(train_idx, device=device)
    counts = np.bincount(data.labels[train_idx], minlength=num_classes)
    weights = class_weights(counts, cfg.class_weighting, cfg.effective_beta)
    criterion = nn.CrossEntropyLoss(
        weight=None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device),
        label_smoothing=cfg.label_smoothing)

    model = build_model(num_classes, cfg.pretrained).to(device, memory_format=layout)
    optimizer = make_optimizer(model, cfg)
    batch_size = min(cfg.batch_size, len(train_idx))
    steps_per_epoch = len(train_idx) // batch_size  # drop the last partial batch: BatchNorm needs > 1 sample
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch))

    history: list[dict[str, float]] = []
    best_epoch, start_epoch = 0, 0
    if resume and (out / "last.pt").is_file():
        state = torch.load(out / "last.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best_epoch, start_epoch = list(state["history"]), int(state["best_epoch"]), int(state["epoch"])
        log.info("resuming %s after epoch %d", out, start_epoch)
    step_model = torch.compile(model) if cfg.compile else model
    best_weights = copy.deepcopy(model)  # the best epoch's weights, on the device until best.pt is due
    best_written, saved_at = best_epoch, time.monotonic()
    writer = _tensorboard_writer(out, start_epoch) if tensorboard else None
    first_step_at: float | None = None  # Unix time; lets a sweep benchmark measure start-up exactly

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        # A generator per epoch, seeded from (seed, epoch): a resumed run draws what the uninterrupted one would.
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed * 1_000_003 + epoch)
        order = train_idx_d[torch.randperm(len(train_idx_d), generator=gen, device=device)]
        step_model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        started = time.perf_counter()
        first_step_at = first_step_at or time.time()
        bar = _progress(steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", progress)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = augment_batch(gather_batch(images, idx, device), cfg, gen).contiguous(memory_format=layout)
            y = labels[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = step_model(x)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # Accumulated on the device: reading them back every step would stall a GPU.
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            bar.update(1)
        seen = steps_per_epoch * batch_size
        train_loss = loss_sum.item() / seen
        elapsed = time.perf_counter() - started
        if not math.isfinite(train_loss):
            bar.close()
            raise TrainingDiverged(f"training diverged: the training loss is {train_loss} in epoch {epoch} "
                                   f"(lr={cfg.lr}); lower the learning rate")
        val_probs, val_loss = _predict(step_model, images, val_idx, labels, device, cfg.eval_batch_size, bf16)
        metrics = {"epoch": float(epoch), "lr": float(scheduler.get_last_lr()[0]),
                   "train_loss": train_loss, "train_accuracy": correct.item() / seen,
                   **classification_metrics(data.labels[val_idx], val_probs, "val_", val_loss),
                   "train_images_per_s": seen / elapsed, "train_epoch_s": elapsed}
        bar.set_postfix(loss=f"{train_loss:.3f}", val_bacc=f"{metrics['val_balanced_accuracy']:.3f}")
        bar.close()
        history.append(metrics)
        if best_epoch == 0 or _better(metrics, history[best_epoch - 1], cfg.select_metric):
            best_epoch = epoch
            best_weights.load_state_dict(model.state_dict())
        if epoch == cfg.epochs or time.monotonic() - saved_at >= checkpoint_every_s:
            if best_written != best_epoch:
                save_model_file(out / "best.pt", best_weights, data.class_names, cfg.to_dict(),
                                {"epoch": best_epoch, "metrics": history[best_epoch - 1]})
                best_written = best_epoch
            atomic.save_torch({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "history": history, "best_epoch": best_epoch},
                              out / "last.pt")
            saved_at = time.monotonic()
        _write_metrics(out, history, best_epoch, cfg, data, complete=epoch == cfg.epochs,
                       first_step_at=first_step_at)
        if writer is not None:
            for key, value in metrics.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch)
            writer.flush()
        log.info("epoch %d/%d %s", epoch, cfg.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
        if on_epoch is not None:
            on_epoch(metrics)
    if writer is not None:
        writer.close()
    if not history:
        raise UserError(f"{out}: nothing to train (the run already has {start_epoch} epochs)")
    _write_metrics(out, history, best_epoch, cfg, data, complete=True, first_step_at=first_step_at)
    return TrainResult(best_metrics=history[best_epoch - 1], last_metrics=history[-1], best_epoch=best_epoch,
                       epochs_run=len(history), history=history, out_dir=out)


def _check_same_run(out: Path, cfg: TrainConfig, resume: bool) -> None:
    """Refuse to resume (or overwrite) a run of another configuration in the same folder."""
    if not (out / "last.pt").is_file():
        return
    if not resume:
        for name in ("last.pt", "best.pt", "metrics.csv", "metrics.json"):
            (out / name).unlink(missing_ok=True)
        return
    previous = TrainConfig.load(out / "config.json").to_dict() if (out / "config.json").is_file() else {}
    differ = [k for k, v in cfg.to_dict().items() if k != "epochs" and previous.get(k, v) != v]
    if differ:
        raise UserError(f"{out} holds a run with another config (key '{differ[0]}' differs); "
                        f"use another --out, or --no-resume to start over")


def dataset_to_device(data: "Dataset", device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images and labels as tensors: on a GPU when they fit, else in host memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arrays from Ray's object store are read-only; we never write them
        images = torch.from_numpy(np.asarray(data.images))
    labels = torch.as_tensor(data.labels, dtype=torch.long, device=device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.numel() < 0.5 * free:
            return images.to(device), labels
        log.info("dataset (%.1f GB) kept in pinned host memory: it does not fit the GPU's free memory",
                 images.numel() / 1e9)
        return images.pin_memory(), labels
    return images, labels


def gather_batch(images: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    if images.device == device:
        return images[idx]
    return images[idx.cpu()].pin_memory().to(device, non_blocking=True)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm parameters and biases (the usual practice for ResNets).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters; on this project's 2-core CPU the default (foreach) AdamW
    # step took several times longer than the fused one for ResNet-18's 11M parameters.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` (a factor of ``cfg.lr`` per step)."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))

    return factor


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, idx: np.ndarray, labels: torch.Tensor | None,
             device: torch.device, batch_size: int, bf16: bool) -> tuple[np.ndarray, float]:
    """Softmax probabilities [N, C] for ``images[idx]`` and, with labels, the plain cross-entropy."""
    model.eval()
    idx_t = torch.as_tensor(idx, device=device)
    probs, loss_sum = [], torch.zeros((), device=device)
    for start in range(0, len(idx_t), batch_size):
        batch = idx_t[start:start + batch_size]
        x = normalize(gather_batch(images, batch, device)).contiguous(memory_format=memory_format(True, device, bf16))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).float()
        if labels is not None:
            loss_sum += nn.functional.cross_entropy(logits, labels[batch], reduction="sum")
        probs.append(torch.softmax(logits, 1))
    out = torch.cat(probs).cpu().numpy().astype(np.float64)
    return out, loss_sum.item() / max(1, len(idx_t))


def predict_probs(model: nn.Module, images_uint8: np.ndarray | torch.Tensor, device: str | torch.device = "cpu",
                  batch_size: int = 256, precision: str = "auto") -> np.ndarray:
    """Class probabilities [N, C] of a model for uint8 images [N, 3, S, S]."""
    device = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = torch.as_tensor(np.asarray(images_uint8)) if not isinstance(images_uint8, torch.Tensor) \
            else images_uint8
    model = model.to(device)
    probs, _ = _predict(model, images.to(device), np.arange(len(images)), None, device, batch_size,
                        use_bf16(precision, device))
    return probs


def _better(new: dict[str, float], old: dict[str, float], metric: str) -> bool:
    a, b = new[metric], old[metric]
    if math.isnan(b):
        return not math.isnan(a)
    return a < b if metric.endswith("loss") else a > b


def _write_metrics(out: Path, history: list[dict[str, float]], best_epoch: int, cfg: TrainConfig,
                   data: "Dataset", complete: bool, first_step_at: float | None) -> None:
    import pandas as pd

    atomic.write_text(out / "metrics.csv", pd.DataFrame(history).to_csv(index=False))
    atomic.write_json(out / "metrics.json", {
        "status": "complete" if complete else "running",
        "select_metric": cfg.select_metric, "best_epoch": best_epoch, "epochs_run": len(history),
        "best": history[best_epoch - 1], "last": history[-1],
        "first_step_unix_time": first_step_at,  # of this process's first training step (after a resume: its own)
        "data": {"path": data.root, "layout": data.layout, "fingerprint": data.fingerprint,
                 "class_names": list(data.class_names)},
    })


def _tensorboard_writer(out: Path, start_epoch: int):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a killed run wrote after its last checkpoint, so curves do not fork.
    return SummaryWriter(log_dir=str(out), purge_step=start_epoch + 1 if start_epoch else None)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False, dynamic_ncols=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune ResNet-18 on a skin-lesion dataset (one run, no sweep).",
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

    cfg = (TrainConfig.load(args.config) if args.config else TrainConfig()).with_overrides(args.overrides)
    from core.data import load_for_config  # after the config: a bad key fails before any data work

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_for_config(args.data, cfg, splits_file=args.splits)
    result = train(cfg, data, args.out, resume=not args.no_resume)
    best = result.best_metrics
    print(f"best epoch {result.best_epoch}/{result.epochs_run}: "
          + ", ".join(f"{k}={best[k]:.4f}" for k in ("val_balanced_accuracy", "val_accuracy", "val_macro_f1",
                                                       "val_auc", "val_loss")))
    print(f"outputs in {result.out_dir} (metrics.json, metrics.csv, best.pt); "
          f"tensorboard --logdir {result.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
