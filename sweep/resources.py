"""Where a sweep runs: its own local Ray or a cluster it joins, and how trials share GPUs and CPUs.

Not a command; ``python -m sweep.run`` calls :func:`connect_ray` and :func:`plan_resources`.

Without ``--address`` the sweep always starts a Ray of its own on this machine (``address="local"``),
even when a cluster started with ``ray start`` is recorded in Ray's temp folder
(``/tmp/ray/ray_current_cluster``): a plain ``ray.init()`` would join that cluster (alive or dead),
and fail because it was given CPU and GPU counts. With ``--address`` it joins that cluster.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.device import usable_cpus
from core.errors import UserError
from sweep.settings import SweepSettings

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Resources:
    """How the sweep shares the machine (or cluster) out."""

    cpus: int
    gpus: int
    cpus_per_trial: int
    gpus_per_trial: float
    slots: int                        # trials that run at once

    def describe(self) -> str:
        if self.gpus:
            return (f"{self.slots} trial(s) at once on {self.gpus} GPU(s): {self.gpus_per_trial:g} GPU and "
                    f"{self.cpus_per_trial} CPU(s) per trial")
        return f"{self.slots} trial(s) at once on {self.cpus} CPU(s), {self.cpus_per_trial} per trial, no GPU"

    @property
    def per_trial(self) -> dict[str, float]:
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}


def plan_resources(settings: SweepSettings, cpus: int, gpus_available: int, where: str) -> Resources:
    """GPUs and CPUs per trial and how many trials run at once; impossible requests fail here."""
    gpus = gpus_available if settings.gpus is None else settings.gpus
    if gpus < 0:
        raise UserError(f"--gpus {gpus}: must be 0 or more")
    if gpus > gpus_available:
        raise UserError(f"--gpus {gpus}: {where} has {gpus_available} GPU(s)"
                        + (" (use --gpus 0 to train on the CPU)" if gpus_available == 0 else ""))
    if gpus == 0:
        if settings.gpus_per_trial:
            raise UserError(f"--gpus-per-trial {settings.gpus_per_trial:g} needs GPUs, but the sweep uses none "
                            f"(--gpus 0 or no GPU on {where})")
        cpt = settings.cpus_per_trial or max(1, cpus // max(1, min(settings.trials, cpus)))
        _check_cpus(cpt, cpus, where)
        return Resources(cpus=cpus, gpus=0, cpus_per_trial=cpt, gpus_per_trial=0.0, slots=cpus // cpt)
    gpt = 1.0 if settings.gpus_per_trial is None else float(settings.gpus_per_trial)
    if not 0 < gpt <= gpus or gpt > 1 and not gpt.is_integer():
        raise UserError(f"--gpus-per-trial {gpt:g}: must be a fraction in (0, 1] or a whole number up to "
                        f"--gpus {gpus}")
    gpu_slots = math.floor(gpus / gpt + 1e-9)
    cpt = settings.cpus_per_trial or max(1, cpus // gpu_slots)
    _check_cpus(cpt, cpus, where)
    return Resources(cpus=cpus, gpus=gpus, cpus_per_trial=cpt, gpus_per_trial=gpt,
                     slots=max(1, min(gpu_slots, cpus // cpt)))


def _check_cpus(cpt: int, cpus: int, where: str) -> None:
    if not 1 <= cpt <= cpus:
        raise UserError(f"--cpus-per-trial {cpt}: must be between 1 and the {cpus} CPU(s) of {where}")


def plan_on_ray(settings: SweepSettings) -> Resources:
    """:func:`plan_resources` for what the connected Ray (this machine or a cluster) offers."""
    import ray

    cluster = ray.cluster_resources()
    where = "this machine" if len(ray.nodes()) <= 1 else "the Ray cluster"
    return plan_resources(settings, int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0)), where)


def connect_ray(settings: SweepSettings, address: str | None, echo: Callable[[str], None]) -> bool:
    """Start Ray for this machine, or join ``address``; returns whether this call connected (so must shut down)."""
    import ray

    # Tune's own TensorBoard logger would duplicate core.train's curves in the logdir (JSON is added back).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Every checkpoint forces an experiment snapshot (num_to_keep=1): wanted, for --resume; not worth a warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    # Trial processes import core/ and sweep/ from this checkout (the project need not be installed).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"--address {address}: cannot join the Ray cluster ({exc})") from None
        return True
    cpus = usable_cpus()
    resources = plan_resources(settings, cpus, _local_gpus(), "this machine")  # fails before starting anything
    other = other_cluster()
    if other:
        echo(f"notice: a Ray cluster is recorded on this machine ({other}); this sweep starts its own local Ray "
             f"(--address {other} joins that one instead)")
    ray.init(address="local", num_cpus=cpus, num_gpus=resources.gpus, include_dashboard=False, log_to_driver=True)
    return True


def other_cluster() -> str | None:
    """The cluster a plain ``ray.init()`` would join: ``RAY_ADDRESS``, else the last ``ray start`` recorded."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._common.utils import get_ray_address_file  # Ray's own path (honours RAY_TMPDIR)

        path = Path(get_ray_address_file(None))
    except ImportError:  # moved in another Ray version: its usual place
        path = Path("/tmp/ray/ray_current_cluster")
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()
