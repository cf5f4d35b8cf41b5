"""Everything a training run writes besides the model's own computation: one small writer per run.

:class:`RunWriter` claims the run folder (refusing to resume a run of another configuration), writes
``config.json`` and ``splits.csv``, restores the resume state, and after each epoch keeps the best epoch's
weights, writes the checkpoints (``best.pt``, ``last.pt``: at most every ``checkpoint_every_s`` seconds and
after the last epoch), ``metrics.csv``, ``run.json``, TensorBoard scalars and one log line. File names and
schemas: core/filenames.py. Every file is written atomically, so a killed run leaves the previous version
(and the temporary files it was writing, which the next run on the folder deletes). A damaged resume state
(``last.pt``, ``config.json``) is a one-line error saying how to go on (core/io/state_files.py).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from core.io import atomic
from core import filenames
from core.config import TrainConfig
from core.errors import UserError
from core.metric_names import minimised
from core.model.networks import save_model_file
from core.data.splits import write_splits
from core.io.state_files import load_torch, reading, writing

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch.optim.lr_scheduler import LRScheduler
    from torch.optim.swa_utils import AveragedModel

    from core.data.dataset import Dataset

log = logging.getLogger(__name__)


class WriteOptions(Protocol):
    """What the writer reads of core.train.RunOptions (a Protocol: core.train imports this module)."""

    @property
    def resume(self) -> bool: ...
    @property
    def tensorboard(self) -> bool: ...
    @property
    def keep_last(self) -> bool: ...
    @property
    def checkpoint_every_s(self) -> float: ...

# What a run writes atomically (a killed run leaves their temporary files), and what to do about damage.
RUN_FILES = (filenames.CONFIG, filenames.SPLITS, filenames.METRICS_CSV, filenames.RUN_STATE,
             filenames.BEST_CHECKPOINT, filenames.LAST_CHECKPOINT, filenames.VAL_PROBS)
RESUME_ADVICE = "start the run over with --no-resume, or use another --out"


class RunWriter:
    """The outputs of one training run in ``out``; see the module docstring."""

    def __init__(self, out: Path, cfg: TrainConfig, data: "Dataset", options: WriteOptions) -> None:
        self.out, self.cfg, self.data, self.options = Path(out), cfg, data, options
        self.out.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temps(self.out, RUN_FILES)
        self.resume = _claim(self.out, cfg, options.resume)
        atomic.write_text(self.out / filenames.CONFIG, cfg.to_json())
        write_splits(data, self.out / filenames.SPLITS)
        self.history: list[dict[str, float]] = []
        self.best_epoch = self.start_epoch = self.best_written = 0
        self.first_step_at: float | None = None  # Unix time; lets a sweep benchmark measure start-up exactly
        self._best_weights: nn.Module | None = None
        self._best_val_probs: Any = None  # the best epoch's val probabilities, written with best.pt (val_probs.npz)
        self._saved_at = time.monotonic()
        self._tb: Any = None

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                ema: AveragedModel | None) -> int:
        """Load ``last.pt`` into the training state when resuming; returns the epoch to continue after."""
        path = self.out / filenames.LAST_CHECKPOINT
        if self.resume and path.is_file():
            state = load_torch(path, RESUME_ADVICE, map_location=next(model.parameters()).device)
            # A state of another model (another dataset's classes) or an older layout: no traceback either.
            with reading(path, RESUME_ADVICE, KeyError, TypeError, ValueError, RuntimeError):
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                if ema is not None:
                    ema.load_state_dict(state["ema"])
                self.history, self.best_epoch = list(state["history"]), int(state["best_epoch"])
                self.start_epoch, self.best_written = int(state["epoch"]), self.best_epoch  # best.pt holds it
            log.info("resuming %s after epoch %d", self.out, self.start_epoch)
        if self.options.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint, so curves do not fork.
            with writing(self._events):
                self._tb = SummaryWriter(log_dir=str(self.out),
                                         purge_step=self.start_epoch + 1 if self.start_epoch else None)
        self._saved_at = time.monotonic()
        return self.start_epoch

    def epoch_started(self) -> None:
        self.first_step_at = self.first_step_at or time.time()

    def epoch_done(self, metrics: dict[str, float], evaluated: nn.Module, training_state: dict[str, Any],
                   val_probs: np.ndarray | None = None) -> None:
        """Record an epoch: ``evaluated`` is the (uncompiled) model its val metrics are of (the EMA if any);
        ``val_probs``: its validation probabilities [N, C], kept beside best.pt for a sweep's ensemble."""
        epoch = int(metrics["epoch"])
        self.history.append(metrics)
        if self._best_weights is None:
            self._best_weights = copy.deepcopy(evaluated)  # on the device until best.pt is due
        if self.options.keep_last or self.best_epoch == 0 or better(metrics, self.history[self.best_epoch - 1],
                                                                    self.cfg.select_metric):
            self.best_epoch = epoch
            self._best_weights.load_state_dict(evaluated.state_dict())
            self._best_val_probs = val_probs
        last = epoch == self.cfg.epochs
        if last or time.monotonic() - self._saved_at >= self.options.checkpoint_every_s:
            self._save_checkpoints(epoch, training_state)
        self._write_run_files(complete=last)
        if self._tb is not None:
            with writing(self._events):  # TensorBoard's writer thread hands a full disk's error over here
                for key, value in metrics.items():
                    if key != "epoch":
                        self._tb.add_scalar(key, value, epoch)
                self._tb.flush()
        log.info("epoch %d/%d %s", epoch, self.cfg.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))

    def close(self) -> None:
        if self._tb is not None:
            with writing(self._events):
                self._tb.close()
        if not self.history:
            raise UserError(f"{self.out}: nothing to train (the run already has {self.start_epoch} epochs)")
        self._write_run_files(complete=True)

    @property
    def _events(self) -> Path:
        return self.out / "events.out.tfevents.*"

    def _save_checkpoints(self, epoch: int, training_state: dict[str, Any]) -> None:
        if self.best_written != self.best_epoch:
            save_model_file(self.out / filenames.BEST_CHECKPOINT, self._best_weights, self.data.class_names,
                            self.cfg.to_dict(), {"epoch": self.best_epoch, "metrics": self.history[self.best_epoch - 1]})
            self._write_val_probs()
            self.best_written = self.best_epoch
        atomic.save_torch({"epoch": epoch, **training_state, "history": self.history, "best_epoch": self.best_epoch},
                          self.out / filenames.LAST_CHECKPOINT)
        self._saved_at = time.monotonic()

    def _write_val_probs(self) -> None:
        """val_probs.npz beside best.pt (core/filenames.py): what a sweep chooses its ensemble on."""
        if self._best_val_probs is None:
            return
        import numpy as np

        val_idx = self.data.indices("val")
        with atomic.atomic_path(self.out / filenames.VAL_PROBS) as tmp, open(tmp, "wb") as f:
            np.savez(f, probs=np.asarray(self._best_val_probs, np.float32), labels=self.data.labels[val_idx],
                     image_ids=np.asarray(self.data.image_ids[val_idx], dtype=str), epoch=self.best_epoch)

    def _write_run_files(self, complete: bool) -> None:
        import pandas as pd

        atomic.write_text(self.out / filenames.METRICS_CSV, pd.DataFrame(self.history).to_csv(index=False))
        atomic.write_json(self.out / filenames.RUN_STATE, {
            "status": "complete" if complete else "running",
            "chosen_by": "last epoch" if self.options.keep_last else self.cfg.select_metric,
            "best_epoch": self.best_epoch, "epochs_run": len(self.history),
            "best": self.history[self.best_epoch - 1], "last": self.history[-1],
            "first_step_unix_time": self.first_step_at,  # of this process's first step (after a resume: its own)
            "data": {"path": self.data.root, "layout": self.data.layout, "fingerprint": self.data.fingerprint,
                     "class_names": list(self.data.class_names)},
        })


def better(new: dict[str, float], old: dict[str, float], metric: str) -> bool:
    a, b = new[metric], old[metric]
    if math.isnan(b):
        return not math.isnan(a)
    return a < b if minimised(metric) else a > b


def _claim(out: Path, cfg: TrainConfig, resume: bool) -> bool:
    """Whether to resume from ``out``; refuses a run of another configuration, and without ``resume`` clears
    the old run's files."""
    if not (out / filenames.LAST_CHECKPOINT).is_file():
        return resume
    if not resume:
        for name in (filenames.LAST_CHECKPOINT, filenames.BEST_CHECKPOINT, filenames.METRICS_CSV, filenames.RUN_STATE):
            (out / name).unlink(missing_ok=True)
        return False
    config = out / filenames.CONFIG
    with reading(config, RESUME_ADVICE):
        previous = TrainConfig.load(config).to_dict() if config.is_file() else {}
    differ = [k for k, v in cfg.to_dict().items() if k != "epochs" and previous.get(k, v) != v]
    if differ:
        raise UserError(f"{out} holds a run with another config (key '{differ[0]}' differs); "
                        f"use another --out, or --no-resume to start over")
    return True
