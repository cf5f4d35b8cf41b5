"""Training images per second: this project's pipeline against the usual one, and against the model alone.

    python -m bench.train_throughput --out bench-cpu.json                 # CPU: 64 px, batch 64
    python -m bench.train_throughput --device cuda --precision bf16 --out bench-gpu.json   # GPU: 224 px, batch 256

Three pipelines train the same ResNet-18 (``core.model.networks.build_model(C, "none")``) on the same images with
the same batch size, image size and optimiser, one after another in one process, ``--repeats`` rounds
(the order turns each round, so machine load hits all alike); the median round is reported:

- usual: a torch Dataset that opens each JPEG file with PIL and applies torchvision transforms
  (RandomResizedCrop, flips, quarter turns, RandomRotation, ColorJitter, ToTensor, Normalize) in
  DataLoader workers (``--workers``); fp32, contiguous tensors. ``--warmup`` steps, then ``--steps`` timed.
- project: ``core.train.train`` itself, on those images decoded once to uint8 (``core.data.dataset``), held in
  memory (on the GPU when it fits), augmented per sample on the device (``core.training.augment``), bf16 autocast
  and channels_last on CUDA (``--precision bf16`` on a CPU: bf16 autocast and channels_last). One warm-up epoch of ``--steps`` steps, then the ``train_images_per_s``
  that ``train`` measures itself over the timed epochs (validation and checkpoints are outside it).
- compute: forward, backward and optimiser step on one fixed, pre-normalised batch already on the
  device, with the project's precision and memory format: the model's own cost, no data path at all.

Prints the three figures, ``ratio`` (project / usual) and how far the project is below compute;
``--out`` writes them, per round and as medians, with the machine and the data, as JSON. Runs on
``../shared/data/ham10000-200x150`` when it is there, else on generated data (core.data.demo_data), and says
which. With 200x150 JPEGs and 224 px both pipelines upscale.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from bench.common import (GpuUtilization, Stopwatch, bench_data, bench_parser, command_line, machine_info, median,
                          write_result)
from core.model.forward import IMAGENET_MEAN, IMAGENET_STD, normalize
from core.config import TrainConfig
from core.device import usable_cpus
from core.errors import UserError, run_cli
from core.train import RunOptions, train

log = logging.getLogger(__name__)

PIPELINES = ("usual", "project", "compute")
# Augmentation both pipelines apply (the usual pipeline's torchvision equivalents); --set changes it.
BENCH_AUGMENTATION = {"rotation_degrees": 15.0}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from core.data.dataset import load_dataset
    from core.device import memory_format, resolve_device, use_bf16

    cfg = _bench_config(args)
    device = resolve_device(cfg)  # UserError when --device cuda has no GPU
    if args.sync_debug and device.type != "cuda":
        raise UserError("--sync-debug needs a CUDA device")
    image_size = cfg.image_size
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("core").setLevel(logging.WARNING)  # train() logs every epoch of every round

    source = bench_data(args.data, demo_lesions=args.demo_lesions, demo_image_size=max(64, image_size))
    data = load_dataset(source.path, image_size, progress=True)
    files = _image_files(data)
    with Image.open(files[0]) as first:
        jpeg_size = list(first.size)
    n = len(data.labels)
    n_val = max(1, min(cfg.batch_size, n // 10))
    if n - n_val < cfg.batch_size:
        raise UserError(f"{source.path}: {n} images are too few for batch size {cfg.batch_size}")
    log.info("data: %s at %s (%d images, files %dx%d px, trained at %d px) on %s", source.source, source.path,
             n, *jpeg_size, image_size, device)

    usual = _UsualPipeline(files, data.labels, len(data.class_names), cfg, device, args.workers)
    compute = _ComputeOnly(data, cfg, device)
    costs = _Costs(data, files, usual.transform, compute, cfg, device)
    rng = np.random.default_rng(args.seed)
    rounds: list[dict[str, dict[str, float | None]]] = []
    for round_ in range(args.repeats):
        # A fresh random subset each round: project and usual train on the same images in a round.
        order = rng.permutation(n)
        train_idx = order[n_val:n_val + min(args.steps * cfg.batch_size, n - n_val)]
        val_idx = order[:n_val]
        runs: dict[str, Callable[[], tuple[float, float | None]]] = {
            "usual": lambda: usual.run(train_idx, args.warmup, args.steps, seed=args.seed + round_),
            "project": lambda: _project_round(data, cfg, device, train_idx, val_idx, args.steps),
            "compute": lambda: compute.run(args.warmup, args.steps),
        }
        figures: dict[str, dict[str, float | None]] = {}
        turn = round_ % len(PIPELINES)
        for name in PIPELINES[turn:] + PIPELINES[:turn]:
            images_per_s, utilization = runs[name]()
            figures[name] = {"images_per_s": round(images_per_s, 2), "gpu_utilization_pct": utilization,
                             "load_average_1min": round(os.getloadavg()[0], 2)}
            log.info("round %d/%d %-8s %9.1f images/s", round_ + 1, args.repeats, name, images_per_s)
        figures["cost_ms_per_image"] = costs.run(train_idx[:cfg.batch_size], repeats=2)
        rounds.append(figures)

    result = _summary(rounds)
    bf16 = use_bf16(cfg.precision, device)
    if args.sync_debug:
        result["sync_points"] = _sync_points(data, cfg, train_idx, val_idx)
    result.update(
        benchmark="train_throughput", command=command_line(__spec__.name, argv),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=machine_info(device),
        data={"source": source.source, "path": str(source.path), "layout": data.layout, "images": n,
              "file_size_px": jpeg_size, "image_size": image_size},
        settings={"device": str(device), "image_size": image_size, "batch_size": cfg.batch_size,
                  "precision_project": "bf16" if bf16 else "fp32", "precision_usual": "fp32",
                  "channels_last": memory_format(cfg.channels_last, device, bf16) == torch.channels_last,
                  "compile": cfg.compile,
                  "workers": args.workers, "steps": args.steps, "warmup_steps": args.warmup,
                  "repeats": args.repeats, "optimizer": cfg.optimizer,
                  "augmentation": {k: getattr(cfg, k) for k in ("hflip", "vflip", "rot90", "rotation_degrees",
                                                                "crop_scale_min", "color_jitter")}},
        rounds=rounds)
    _print(result)
    write_result(result, args.out)
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.train_throughput", __doc__)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--image-size", type=int, help="training image side (default: 224 on CUDA, 64 on CPU)")
    parser.add_argument("--batch-size", type=int, help="default: 256 on CUDA, 64 on CPU")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="of the project and compute pipelines (the usual one is fp32); auto: bf16 on CUDA")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels_last memory format on CUDA, and on the CPU with bf16 (project and compute)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (project and compute)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per pipeline and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them (usual, compute)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--workers", type=int, default=usable_cpus(),
                        help="DataLoader workers of the usual pipeline (default: the cores)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a TrainConfig key for both pipelines, e.g. color_jitter=0.2 (default: the "
                             f"config's defaults with {BENCH_AUGMENTATION})")
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA: also run one epoch of core.train under torch.cuda.set_sync_debug_mode and "
                             "list where the host waited for the GPU (untimed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.workers < 0:
        parser.error("--warmup and --workers must not be negative")
    return args


def _bench_config(args: argparse.Namespace) -> TrainConfig:
    cuda = args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
    base = TrainConfig(pretrained="none", device=args.device, precision=args.precision,
                       channels_last=args.channels_last, compile=args.compile,
                       image_size=args.image_size or (224 if cuda else 64),
                       batch_size=args.batch_size or (256 if cuda else 64), **BENCH_AUGMENTATION)
    return base.with_overrides(args.overrides)


def _image_files(data) -> list[Path]:
    """The image file of each of ``data``'s images, in its order."""
    from core.data.layouts import read_layout

    listing = read_layout(data.root)
    by_id = dict(zip(listing.image_ids, listing.paths))
    return [by_id[image_id] for image_id in data.image_ids]


# --- the project's pipeline: core.train.train itself -------------------------------------------------------
QUIET = RunOptions(resume=False, tensorboard=False, progress=False)

def _project_round(data, cfg: TrainConfig, device: torch.device, train_idx: np.ndarray, val_idx: np.ndarray,
                   steps: int) -> tuple[float, float | None]:
    """One warm-up epoch, then enough timed epochs for ``steps`` steps; images/s as train() measured it."""
    split = np.full(len(data.labels), "test", dtype="<U5")
    split[train_idx], split[val_idx] = "train", "val"
    steps_per_epoch = len(train_idx) // cfg.batch_size
    epochs = 1 + math.ceil(steps / steps_per_epoch)
    run_cfg = dataclasses.replace(cfg, epochs=epochs, warmup_epochs=min(cfg.warmup_epochs, epochs))
    epoch_ends: list[float] = []  # the next epoch's training loop starts as the callback returns

    with tempfile.TemporaryDirectory(prefix="bench-train-") as out, GpuUtilization(device) as utilization:
        result = train(run_cfg, dataclasses.replace(data, split=split), out, lambda _: epoch_ends.append(time.time()),
                       QUIET)
    timed = result.history[1:]
    seconds = sum(m["train_epoch_s"] for m in timed)
    images = sum(m["train_images_per_s"] * m["train_epoch_s"] for m in timed)
    # Utilisation while the timed epochs' training loops ran, not their validation and checkpoints.
    loops = [(start, start + m["train_epoch_s"]) for start, m in zip(epoch_ends, timed)]
    return images / seconds, utilization.mean_within(loops)


def _sync_points(data, cfg: TrainConfig, train_idx: np.ndarray, val_idx: np.ndarray) -> list[dict[str, object]]:
    """Where one epoch of core.train made the host wait for the GPU: source lines and how often."""
    split = np.full(len(data.labels), "test", dtype="<U5")
    split[train_idx], split[val_idx] = "train", "val"
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as out, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(dataclasses.replace(cfg, epochs=1, warmup_epochs=0.0), dataclasses.replace(data, split=split),
                  out, options=QUIET)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            where = f"{Path(warning.filename).name}:{warning.lineno}"
            counts[where] = counts.get(where, 0) + 1
    steps = len(train_idx) // cfg.batch_size
    log.info("host-device synchronisations in one epoch of %d steps: %s", steps, counts or "none")
    return [{"where": where, "count": n, "per_step": n >= steps}
            for where, n in sorted(counts.items(), key=lambda item: -item[1])]


# --- the model alone ---------------------------------------------------------------------------------------

class _ComputeOnly:
    """Training steps on one fixed batch already normalised on the device: no data path at all."""

    def __init__(self, data, cfg: TrainConfig, device: torch.device):
        from core.model.networks import build_model
        from core.device import memory_format, use_bf16
        from core.training.optim import make_optimizer

        self.device, self.bf16 = device, use_bf16(cfg.precision, device)
        layout = memory_format(cfg.channels_last, device, self.bf16)
        batch = torch.as_tensor(np.asarray(data.images[:cfg.batch_size]))
        if len(batch) < cfg.batch_size:  # fewer images than a batch: repeat them
            batch = batch.repeat(math.ceil(cfg.batch_size / len(batch)), 1, 1, 1)[:cfg.batch_size]
        self.x = normalize(batch.to(device)).contiguous(memory_format=layout)
        self.y = torch.as_tensor(np.resize(data.labels, len(self.x)), device=device)
        self.model = build_model(len(data.class_names), "none").to(device, memory_format=layout)
        self.optimizer = make_optimizer(self.model, cfg)
        self.step_model = torch.compile(self.model) if cfg.compile else self.model
        self.criterion = nn.CrossEntropyLoss()

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.step_model(self.x)
        loss = self.criterion(logits.float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def run(self, warmup: int, steps: int) -> tuple[float, float | None]:
        self.model.train()
        for _ in range(warmup):
            self.step()
        with GpuUtilization(self.device) as utilization, Stopwatch(self.device) as watch:
            for _ in range(steps):
                self.step()
        return steps * len(self.x) / watch.seconds, utilization.mean


# --- what each part costs, back to back on one batch -------------------------------------------------------

class _Costs:
    """Milliseconds per image of the usual data path (open, decode and transform each JPEG, in this
    process), the project's (gather the uint8 batch, ``augment_batch``) and the model's training step,
    each as CPU time of this process (all its threads) and as wall time (device synchronised).

    Run back to back on the same batch, so load from other processes hits all three alike; CPU time
    hardly depends on that load at all. On a CPU-bound machine, images/s ~ cores / (CPU ms per image).
    """

    def __init__(self, data, files: Sequence[Path], transform: Callable, compute: "_ComputeOnly",
                 cfg: TrainConfig, device: torch.device):
        from core.device import dataset_to_device, memory_format, use_bf16

        self.jpegs = _JpegFiles(files, data.labels, transform)
        self.images, _ = dataset_to_device(data, device)
        self.compute, self.cfg, self.device = compute, cfg, device
        self.memory_format = memory_format(cfg.channels_last, device, use_bf16(cfg.precision, device))
        self.generator = torch.Generator(device=device).manual_seed(0)

    def run(self, idx: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
        from core.training.augment import augment_batch
        from core.device import gather_batch

        idx_device = torch.as_tensor(idx, device=self.device)
        parts: dict[str, Callable[[], object]] = {
            "usual_data": lambda: [self.jpegs[i] for i in idx],
            "project_data": lambda: augment_batch(gather_batch(self.images, idx_device, self.device), self.cfg,
                                                  self.generator).contiguous(memory_format=self.memory_format),
            "compute_step": self.compute.step,
        }
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in parts}
        for _ in range(repeats):
            for name, part in parts.items():
                cpu = time.process_time()
                with Stopwatch(self.device) as watch:
                    part()
                samples[name].append((time.process_time() - cpu, watch.seconds))
        return {name: {"cpu": round(1000 * median([c for c, _ in s]) / len(idx), 3),
                       "wall": round(1000 * median([w for _, w in s]) / len(idx), 3)}
                for name, s in samples.items()}


# --- the usual pipeline: JPEG files, PIL transforms in DataLoader workers, fp32 ------------------------------

class _JpegFiles(torch.utils.data.Dataset):
    """ImageFolder-style: each item opens its file with PIL and runs the transforms on it."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, transform: Callable):
        self.paths, self.labels, self.transform = list(paths), labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            rgb = image.convert("RGB")
        return self.transform(rgb), int(self.labels[index])


class _QuarterTurn:
    """A random multiple of 90 degrees (torchvision has no such transform)."""

    TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __call__(self, image: Image.Image) -> Image.Image:
        turn = self.TURNS[random.randrange(4)]
        return image if turn is None else image.transpose(turn)


def usual_transform(cfg: TrainConfig):
    """torchvision transforms doing what ``core.training.augment.augment_batch`` does with ``cfg``."""
    from torchvision import transforms as T

    size = cfg.image_size
    steps: list[Callable] = [T.RandomResizedCrop(size, scale=(cfg.crop_scale_min, 1.0))
                             if cfg.crop_scale_min < 1 else T.Resize((size, size))]
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    if cfg.vflip:
        steps.append(T.RandomVerticalFlip())
    if cfg.rot90:
        steps.append(_QuarterTurn())
    if cfg.rotation_degrees > 0:
        steps.append(T.RandomRotation(cfg.rotation_degrees))
    if cfg.color_jitter > 0:
        s = cfg.color_jitter
        steps.append(T.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4)))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


class _UsualPipeline:
    def __init__(self, files: Sequence[Path], labels: np.ndarray, num_classes: int, cfg: TrainConfig,
                 device: torch.device, workers: int):
        from core.model.networks import build_model
        from core.training.optim import make_optimizer

        self.files, self.labels, self.cfg, self.device, self.workers = files, labels, cfg, device, workers
        self.transform = usual_transform(cfg)
        self.model = build_model(num_classes, "none").to(device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.criterion = nn.CrossEntropyLoss()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        loss = self.criterion(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def run(self, subset: np.ndarray, warmup: int, steps: int, seed: int) -> tuple[float, float | None]:
        batch = self.cfg.batch_size
        dataset = _JpegFiles([self.files[i] for i in subset], self.labels[subset], self.transform)
        # Enough draws for warm-up and timed steps, however small the subset (the sampler wraps around).
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=(warmup + steps) * batch,
                                                 generator=torch.Generator().manual_seed(seed))
        # A fresh loader per round: its workers run only while this pipeline does.
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                                             num_workers=self.workers, pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        self.model.train()
        for _ in range(warmup):
            self.step(*next(batches))
        with GpuUtilization(self.device) as utilization, Stopwatch(self.device) as watch:
            for _ in range(steps):
                self.step(*next(batches))
        del batches  # stops the workers before the next pipeline runs
        return steps * batch / watch.seconds, utilization.mean


# --- results -----------------------------------------------------------------------------------------------

def _summary(rounds: list[dict[str, dict[str, float | None]]]) -> dict[str, object]:
    ips = {name: median([r[name]["images_per_s"] for r in rounds]) for name in PIPELINES}
    util = {}
    for name in PIPELINES:
        values = [r[name]["gpu_utilization_pct"] for r in rounds if r[name]["gpu_utilization_pct"] is not None]
        util[name] = median(values) if values else None
    costs = {part: {kind: round(median([r["cost_ms_per_image"][part][kind] for r in rounds]), 3)
                    for kind in ("cpu", "wall")} for part in rounds[0]["cost_ms_per_image"]}
    step = costs["compute_step"]
    shares = {f"{part}_share_pct": {kind: round(100 * costs[part][kind] / (costs[part][kind] + step[kind]), 2)
                                    for kind in ("cpu", "wall")} for part in ("usual_data", "project_data")}
    return {
        "cost_ms_per_image": costs, **shares,
        "usual_images_per_s": round(ips["usual"], 2), "project_images_per_s": round(ips["project"], 2),
        "compute_images_per_s": round(ips["compute"], 2), "ratio": round(ips["project"] / ips["usual"], 3),
        "project_below_compute_pct": round(100 * (1 - ips["project"] / ips["compute"]), 2),
        "gpu_utilization_pct": util,
    }


def _print(result: dict) -> None:
    data, settings, machine = result["data"], result["settings"], result["machine"]
    print(f"data: {data['source']} ({data['path']}; {data['images']} images, files "
          f"{data['file_size_px'][0]}x{data['file_size_px'][1]} px, trained at {data['image_size']} px)")
    print(f"machine: {machine.get('gpu') or machine['cpu']}; {machine['cpus']} CPUs, torch {machine['torch']}; "
          f"batch {settings['batch_size']}, project {settings['precision_project']}, usual fp32, "
          f"{settings['workers']} workers, {settings['repeats']} rounds of {settings['steps']} steps")
    rounds = result["rounds"]
    for name in PIPELINES:
        per_round = " ".join(f"{r[name]['images_per_s']:.1f}" for r in rounds)
        util = result["gpu_utilization_pct"][name]
        print(f"  {name:<8} {result[f'{name}_images_per_s']:>10.1f} images/s (median; rounds: {per_round})"
              + (f", GPU {util:.0f}% busy" if util is not None else ""))
    print(f"ratio project/usual: {result['ratio']:.2f}x; project below compute: "
          f"{result['project_below_compute_pct']:.1f}%")
    costs = result["cost_ms_per_image"]
    print("ms per image, CPU time / wall (median): " + ", ".join(
        f"{part} {c['cpu']:.2f} / {c['wall']:.2f}" for part, c in costs.items()))
    print(f"data path's share of data + step, CPU time / wall: usual {result['usual_data_share_pct']['cpu']:.1f}% / "
          f"{result['usual_data_share_pct']['wall']:.1f}%, project {result['project_data_share_pct']['cpu']:.1f}% / "
          f"{result['project_data_share_pct']['wall']:.1f}%")


if __name__ == "__main__":
    run_cli(main)
