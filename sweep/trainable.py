"""The Ray Tune trainable: one trial is one ``core.train.train`` run in ``results/<sweep>/trials/<trial_id>/``.

Not a command; ``python -m sweep.run`` wraps :func:`run_trial` with ``tune.with_parameters`` (the decoded
dataset travels once through Ray's object store to every trial and node) and ``tune.with_resources``.

Each epoch's metrics dict is reported with ``tune.report`` together with a checkpoint holding the run's
``last.pt``; a trial restored by ``--resume`` (or by a scheduler that paused it) gets that checkpoint
from ``tune.get_checkpoint()`` and continues from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from core.io import atomic
from core import filenames
from core.config import TrainConfig
from sweep.confirm import CONFIRMS_KEY
from sweep.space import config_values
from sweep.storage import TrialFiles

if TYPE_CHECKING:
    from core.data.dataset import Dataset

EPOCH_FILE = "epoch.json"         # the metrics of the checkpointed epoch, beside core.train's last.pt
NODE_FILE = filenames.TRIAL_NODE        # where the trial ran (written by the trial itself)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares besides the data: the fixed config and its share of the machine."""

    base: Mapping[str, Any]       # TrainConfig.to_dict() of everything the space does not search
    trials_dir: str               # results/<sweep>/trials
    cpus: int                     # CPUs of one trial (torch threads)
    gpus: float                   # GPUs of one trial (0: train on the CPU)
    storage: Any = None           # core.io.storage.Store of the sweep in a bucket: the trial uploads its folder there
    failed: Mapping[str, str] = dataclasses.field(default_factory=dict)  # trial id -> error of a trial that
    # failed for itself (a bug, a bad config) in an earlier run: --resume reruns errored trials, not these


class FailedBefore(RuntimeError):
    """A trial that failed for itself before ``--resume``: raised again at once, with its recorded error."""


def trial_config(sampled: Mapping[str, Any], setup: TrialSetup) -> TrainConfig:
    """The trial's complete config: the fixed base with the sampled values (and a confirmation run's seed) on top."""
    values = config_values({k: v for k, v in sampled.items() if k != CONFIRMS_KEY})  # which search trial a run repeats
    return TrainConfig.from_dict(values, base=TrainConfig.from_dict(setup.base))


def run_trial(config: dict[str, Any], data: "Dataset", setup: TrialSetup) -> None:
    """Train one sampled configuration, reporting every epoch to Tune (the function trainable)."""
    import torch
    from ray import tune

    from core.train import RunOptions, train

    torch.set_num_threads(max(1, int(setup.cpus)))
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a "checkpoint created" line per epoch
    trial_id = tune.get_context().get_trial_id()
    if trial_id in setup.failed:  # Ray reran it with the errored trials that storage failed: it stays failed
        raise FailedBefore(setup.failed[trial_id])
    checkpoint = tune.get_checkpoint()
    files = TrialFiles(setup.storage, trial_id) if setup.storage is not None else None
    out = files.prepare(resuming=checkpoint is not None) if files else Path(setup.trials_dir) / trial_id
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".checkpoint-*"):  # a killed trial's, holding a link to an old last.pt
        shutil.rmtree(stale, ignore_errors=True)
    cfg = trial_config(config, setup)
    if cfg.device == "auto":
        # Ray hides the GPUs a trial did not ask for; a CPU trial must not grab a GPU it was not given.
        cfg = dataclasses.replace(cfg, device="cuda" if setup.gpus > 0 else "cpu")
    resumed_from = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resumed_from = restore_checkpoint(Path(folder), out)
        if resumed_from is not None and resumed_from >= cfg.epochs:
            return  # the driver died after the trial's last report: nothing left to train
    _write_node_info(out, trial_id, setup, resumed_from)
    push = files.push if files else lambda: 0
    push()

    def report(metrics: dict[str, float]) -> None:
        push()  # before Tune hears of the epoch: the driver reads the trial's files from the bucket
        # core.train has just written last.pt; Ray copies the folder into its own storage.
        with tempfile.TemporaryDirectory(dir=out, prefix=".checkpoint-") as tmp:
            _link_or_copy(out / filenames.LAST_CHECKPOINT, Path(tmp) / filenames.LAST_CHECKPOINT)
            (Path(tmp) / EPOCH_FILE).write_text(json.dumps(metrics), encoding="utf-8")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    train(cfg, data, out, report, RunOptions(resume=checkpoint is not None, progress=False))
    if files:
        files.push()  # run.json's final state, written after the last report
        files.close()


def restore_checkpoint(folder: Path, out: Path) -> int | None:
    """Put a restored Tune checkpoint's last.pt in the trial folder ``out``; the checkpoint's epoch.

    None when the checkpoint is gone: Ray keeps one checkpoint per trial and deletes the older one as soon
    as a newer one is stored, so a driver killed between that and saving its own state restores a folder
    that no longer exists. The trial folder's own last.pt (core.train resumes from it) is then at least as
    new as the lost checkpoint, so the trial goes on from there instead of failing.
    """
    epoch_file = folder / EPOCH_FILE
    if not epoch_file.is_file():
        log.warning("checkpoint %s is gone (replaced before the driver was killed): resuming from %s", folder,
                    out / filenames.LAST_CHECKPOINT)
        return None
    with atomic.atomic_path(out / filenames.LAST_CHECKPOINT) as tmp:
        shutil.copyfile(folder / filenames.LAST_CHECKPOINT, tmp)
    return int(json.loads(epoch_file.read_text(encoding="utf-8"))["epoch"])


def _write_node_info(out: Path, trial_id: str, setup: TrialSetup, resumed_from: int | None) -> None:
    import ray
    import torch

    info = {"trial_id": trial_id, "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cpus": setup.cpus, "gpus": setup.gpus, "torch_threads": torch.get_num_threads(),
            "resumed_from_epoch": resumed_from, "started": time.time()}
    atomic.write_json(out / NODE_FILE, info)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # last.pt is replaced by rename, never rewritten in place: a hard link is safe
    except OSError:
        shutil.copyfile(src, dst)
