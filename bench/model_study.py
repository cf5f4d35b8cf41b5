"""Do other backbones, clinical fields or mixup/CutMix beat ResNet-18? Paired runs on lesion-grouped splits.

    python -m bench.model_study --out model_study.json      # HAM10000 copy, 64 px, 10 epochs, 3 seeds

For each seed s (``--seeds``) the dataset is split by lesion with ``split_seed`` = s, and every variant
(``--variants``) trains ``--epochs`` epochs at ``--image-size`` px from scratch (``pretrained=none``: no
ImageNet weights offline) with ``seed`` = s, everything else the config's defaults:

  resnet18            the baseline (the config's default)
  efficientnet_b0     arch=efficientnet_b0
  mobilenet_v3_large  arch=mobilenet_v3_large
  resnet18+concat     metadata=concat, metadata_dropout=0.1 (age, sex, site joined to the pooled features)
  resnet18+film       metadata=film, metadata_dropout=0.1 (the metadata scales and shifts the pooled features)
  resnet18+mix        mixup_prob=0.5 and cutmix_prob=1.0: half the batches mixup, the other half CutMix

Each run's best.pt (best epoch by val balanced accuracy) is scored once on the test split: balanced
accuracy and macro AUC with 95% intervals from core/evaluation/bootstrap.py's bootstrap over lesions, and the
training images/s (the median epoch's). Then, per variant, the paired difference against ResNet-18 on
the same split and seed, its mean and sd over the seeds, and a verdict: "gain" or "loss" only where the
95% paired-t interval of the mean difference excludes 0, else "no difference (within seed noise)".

Prints the table; ``--out`` writes every figure as JSON. ``--runs DIR`` keeps the run folders (default: a
temporary folder, removed). Runs on ``../shared/data/ham10000-200x150`` when it is there, else generated data.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.common import command_line, machine_info, study_data, study_parser, write_result, work_folder
from bench.sweep_runs import cell, mean_sd
from core.io import atomic
from core.config import IMAGE_SIZES, image_size_ok
from core.errors import UserError, run_cli

log = logging.getLogger(__name__)

BASELINE = "resnet18"
VARIANTS = {
    "resnet18": {},
    "efficientnet_b0": {"arch": "efficientnet_b0"},
    "mobilenet_v3_large": {"arch": "mobilenet_v3_large"},
    "regnet_y_800mf": {"arch": "regnet_y_800mf"},
    "resnet18+concat": {"metadata": "concat", "metadata_dropout": 0.1},
    "resnet18+film": {"metadata": "film", "metadata_dropout": 0.1},
    "resnet18+mix": {"mixup_prob": 0.5, "cutmix_prob": 1.0},
    "resnet18+mixup": {"mixup_prob": 1.0},
    "resnet18+cutmix": {"cutmix_prob": 1.0},
}
DEFAULT_VARIANTS = ("resnet18", "efficientnet_b0", "mobilenet_v3_large", "resnet18+concat", "resnet18+film",
                    "resnet18+mix")
METRICS = ("test_balanced_accuracy", "test_auc")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    source = study_data(args, f"variants {', '.join(args.variants)}")
    started = time.time()
    runs: list[dict[str, Any]] = []
    loads = []
    with work_folder(args.runs, "bench-models-") as root:
        for seed in args.seeds:
            for variant in args.variants:
                runs.append(run_variant(variant, seed, args, source.path, root))
                loads.append(round(os.getloadavg()[0], 2))
                print(_run_line(runs[-1]), flush=True)
                if args.out:  # so far, after every run: a study cut short keeps what it measured
                    atomic.write_json(args.out, _result(argv, args, source, started, runs, loads))
    result = _result(argv, args, source, started, runs, loads)
    print(table(result["summary"]))
    write_result(result, args.out)
    return 0


def _result(argv: Sequence[str] | None, args: Any, source: Any, started: float, runs: list[dict[str, Any]],
            loads: list[float]) -> dict[str, Any]:
    import torch

    return {"command": command_line("bench.model_study", argv), "data": {"source": source.source,
            "path": str(source.path)}, "settings": {"image_size": args.image_size, "epochs": args.epochs,
            "seeds": args.seeds, "batch_size": args.batch_size, "pretrained": "none", "device": args.device},
            "machine": machine_info(torch.device(args.device)), "load_average_after_each_run": loads,
            "wall_s": round(time.time() - started, 1), "summary": summarize(runs, args.variants), "runs": runs}


def run_variant(variant: str, seed: int, args: Any, data_path: Path, root: Path) -> dict[str, Any]:
    """Train one variant on split ``seed`` with seed ``seed``; its best.pt scored on the test split."""
    from core.evaluation.bootstrap import LesionBootstrap
    from core.config import TrainConfig
    from core.data.dataset import load_for_config
    from core.model.loading import load_for_inference
    from core.evaluation.metrics import classification_metrics
    from core.train import RunOptions, train

    cfg = TrainConfig.from_dict({"image_size": args.image_size, "epochs": args.epochs, "seed": seed,
                                 "split_seed": seed, "pretrained": "none", "device": args.device,
                                 "batch_size": args.batch_size, **VARIANTS[variant]})
    data = load_for_config(str(data_path), cfg, masks=False, progress=False)
    out = root / f"seed{seed}" / variant.replace("+", "_")
    result = train(cfg, data, out, options=RunOptions(progress=False, tensorboard=False))
    loaded = load_for_inference(out / "best.pt", args.device)
    test = data.indices("test")
    probs = loaded.predict(np.asarray(data.images[test]), clinical=loaded.encode_dataset(data, test),
                           calibrated=False)
    scores = classification_metrics(data.labels[test], probs, "test_")
    boot = LesionBootstrap.draw(data.groups[test], n_resamples=args.bootstrap, seed=seed)
    samples = boot.metrics(data.labels[test], probs)
    return {"variant": variant, "seed": seed, "config": {k: v for k, v in VARIANTS[variant].items()},
            "best_epoch": result.best_epoch, "val_balanced_accuracy": result.best_metrics["val_balanced_accuracy"],
            **{key: float(scores[key]) for key in METRICS},
            "test_balanced_accuracy_ci": boot.interval(samples["balanced_accuracy"]),
            "test_auc_ci": boot.interval(samples["auc"]),
            "train_images_per_s": statistics.median(m["train_images_per_s"] for m in result.history),
            "n_test": int(len(test))}


def summarize(runs: list[dict[str, Any]], variants: Sequence[str]) -> dict[str, Any]:
    """Per variant: the metrics' mean +- sd over seeds, and the paired differences against the baseline."""
    from scipy import stats

    by = {(r["variant"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out: dict[str, Any] = {}
    for variant in variants:
        mine = [by[(variant, s)] for s in seeds if (variant, s) in by]
        entry: dict[str, Any] = {key: mean_sd([r[key] for r in mine]) for key in (*METRICS, "train_images_per_s")}
        entry["intervals"] = {key: [r[f"{key}_ci"] for r in mine] for key in METRICS}
        if variant != BASELINE:
            for key in METRICS:
                diffs = [by[(variant, s)][key] - by[(BASELINE, s)][key] for s in seeds
                         if (variant, s) in by and (BASELINE, s) in by]
                entry[f"{key}_diff"] = {**mean_sd(diffs), "per_seed": diffs, "verdict": verdict(diffs, stats)}
        out[variant] = entry
    return out


def verdict(diffs: Sequence[float], stats: Any) -> str:
    """"gain"/"loss" where the 95% paired-t interval of the mean difference excludes 0, else no difference."""
    if len(diffs) < 2:
        return "n/a (one seed: no spread to judge by)"
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / len(diffs) ** 0.5
    if mean - half > 0:
        return "gain"
    if mean + half < 0:
        return "loss"
    return "no difference (within seed noise)"


def table(summary: dict[str, Any]) -> str:
    lines = ["| variant | test balanced accuracy | test macro AUC | bal. acc. - ResNet-18 | AUC - ResNet-18 | "
             "train images/s |", "|---|---|---|---|---|---|"]
    for variant, entry in summary.items():
        diffs = []
        for key in METRICS:
            d = entry.get(f"{key}_diff")
            diffs.append("(baseline)" if d is None else f"{cell(d)}: {d['verdict']}")
        lines.append(f"| {variant} | {cell(entry['test_balanced_accuracy'])} | {cell(entry['test_auc'])} | "
                     f"{diffs[0]} | {diffs[1]} | {cell(entry['train_images_per_s'], 0)} |")
    return "\n".join(lines)


def _run_line(run: dict[str, Any]) -> str:
    ci = run["test_balanced_accuracy_ci"] or [float("nan")] * 2
    return (f"seed {run['seed']} {run['variant']}: test balanced accuracy {run['test_balanced_accuracy']:.3f} "
            f"[{ci[0]:.3f}, {ci[1]:.3f}], macro AUC {run['test_auc']:.3f}, best epoch {run['best_epoch']}, "
            f"{run['train_images_per_s']:.0f} train images/s")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = study_parser("bench.model_study", __doc__, epochs=10)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=tuple(VARIANTS),
                        help=f"what to train (default: {' '.join(DEFAULT_VARIANTS)}); resnet18 is always first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of the lesion bootstrap")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every run trains")
    parser.add_argument("--runs", help="keep the run folders here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    args.variants = [BASELINE] + [v for v in dict.fromkeys(args.variants) if v != BASELINE]
    if args.epochs < 1 or not image_size_ok(args.image_size):
        raise UserError("--epochs must be at least 1 and --image-size in [%d, %d]" % IMAGE_SIZES)
    return args


if __name__ == "__main__":
    run_cli(main)
