"""Where is the lesion? The box head against Grad-CAM's box, the centre prior and the whole image; and does the head
change classification? Paired runs with and without the head on lesion-grouped splits.

    python -m bench.box_study --out box_study.json       # HAM10000 copy, 64 px, 3 epochs, 3 seeds

For each seed s (``--seeds``) the dataset is split by lesion with ``split_seed`` = s, and ResNet-18 trains
``--epochs`` epochs at ``--image-size`` px from scratch (``pretrained=none``), everything else the config's
defaults: without the box head (``box_loss_weight=0``) and with it, once per ``--weights`` (its box_loss_weight).
Each run's best.pt (best epoch by val balanced accuracy) is scored once on the test split: balanced accuracy,
and on the test images with a lesion mask, as core.evaluate does (core/evaluation/localisation.py): the mean IoU and the
share of images with IoU >= 0.3, 0.5 and 0.7 against the mask's box of the head's box, the Grad-CAM box (Guided
Grad-CAM of the predicted class, its threshold chosen on the validation split), the centre prior (the mean box
of the training split) and the whole image, and Grad-CAM's MaxBoxAcc. Per seed, the paired difference of balanced
accuracy (head - no head), its mean and sd over the seeds, and core's verdict ("gain"/"loss" only where the 95%
paired-t interval excludes 0). Then the issue's targets, each met or missed: head mean IoU >= 0.80, IoU >= 0.5
on >= 95% and >= 0.7 on >= 75% of the test images, balanced accuracy not lower (no "loss"), and the Grad-CAM box
ahead of the centre prior (mean IoU).

Prints the table; ``--out`` writes every figure as JSON. Runs on ``../shared/data/ham10000-200x150`` when it is
there, else generated data.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.common import command_line, machine_info, study_data, study_parser, write_result, work_folder
from bench.model_study import verdict
from bench.sweep_runs import cell, mean_sd
from core.io import atomic
from core.config import IMAGE_SIZES, image_size_ok
from core.errors import UserError, run_cli

log = logging.getLogger(__name__)

KINDS = ("head", "gradcam", "centre_prior", "whole_image")
FIGURES = ("mean_iou", "iou_0.3", "iou_0.5", "iou_0.7")
TARGETS = {"mean_iou": 0.80, "iou_0.5": 0.95, "iou_0.7": 0.75}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    source = study_data(args, f"box_loss_weight 0 and {', '.join(f'{w:g}' for w in args.weights)}")
    started = time.time()
    runs: list[dict[str, Any]] = []
    with work_folder(args.runs, "bench-boxes-") as root:
        for seed in args.seeds:
            for weight in (0.0, *args.weights):
                runs.append(run_one(weight, seed, args, source.path, root))
                print(_run_line(runs[-1]), flush=True)
                if args.out:  # after every run: a study cut short keeps what it measured
                    atomic.write_json(args.out, _result(argv, args, source, started, runs))
    result = _result(argv, args, source, started, runs)
    print(table(result["summary"]))
    print(targets_text(result["targets"]))
    write_result(result, args.out)
    return 0


def run_one(weight: float, seed: int, args: Any, data_path: Path, root: Path) -> dict[str, Any]:
    """Train with ``box_loss_weight`` = ``weight`` on split ``seed``; its best.pt scored on the test split."""
    import torch

    from core.model.box_head import capture_boxes
    from core.config import TrainConfig
    from core.data.dataset import load_for_config
    from core.explain.gradcam import CAPTUM_NAMES, DEFAULT_METHOD, gradcam_maps
    from core.model.loading import load_for_inference
    from core.data.lesion_boxes import mask_boxes
    from core.evaluation.localisation import centre_prior, fit_boxes, localisation_section
    from core.evaluation.metrics import classification_metrics
    from core.train import RunOptions, train

    cfg = TrainConfig.from_dict({"image_size": args.image_size, "epochs": args.epochs, "seed": seed,
                                 "split_seed": seed, "pretrained": "none", "device": args.device,
                                 "batch_size": args.batch_size, "box_loss_weight": weight})
    data = load_for_config(str(data_path), cfg, progress=False)   # with the masks
    if data.masks is None:
        raise UserError(f"{data_path}: no lesion masks, so no box to learn or score")
    out = root / f"seed{seed}" / f"weight{weight:g}"
    trained = time.perf_counter()
    result = train(cfg, data, out, options=RunOptions(progress=False, tensorboard=False))
    trained = time.perf_counter() - trained
    scored = time.perf_counter()
    loaded = load_for_inference(out / "best.pt", args.device)
    has = np.asarray(data.has_mask)
    test, val, train_idx = data.indices("test"), data.indices("val"), data.indices("train")
    with capture_boxes(loaded.model) as got:
        probs = loaded.predict(np.asarray(data.images[test]), calibrated=False)
    head = torch.cat(got).numpy() if got else None
    scores = classification_metrics(data.labels[test], probs, "test_")
    # the Grad-CAM box's threshold on val, as core.final_train chooses it
    val_rows = val[has[val]]
    val_images = np.asarray(data.images[val_rows])
    val_maps = gradcam_maps(loaded.model, val_images, loaded.predict(val_images).argmax(1).tolist(), loaded.device)
    val_truth, nonempty = mask_boxes(np.asarray(data.masks[val_rows]))
    keep = nonempty.numpy()
    fitted = fit_boxes(val_maps[keep], val_truth.numpy()[keep],
                       centre_prior(np.asarray(data.masks[train_idx]), has[train_idx]), CAPTUM_NAMES[DEFAULT_METHOD])
    rows = np.flatnonzero(has[test])
    test_maps = gradcam_maps(loaded.model, np.asarray(data.images[test[rows]]), probs[rows].argmax(1).tolist(),
                             loaded.device)
    section = localisation_section(np.asarray(data.masks[test[rows]]), None if head is None else head[rows],
                                   test_maps, fitted)
    return {"box_loss_weight": weight, "seed": seed, "best_epoch": result.best_epoch,
            "val_balanced_accuracy": result.best_metrics["val_balanced_accuracy"],
            "test_balanced_accuracy": float(scores["test_balanced_accuracy"]), "test_auc": float(scores["test_auc"]),
            "n_test": int(len(test)), "cam_fraction": fitted["cam_fraction"], "localisation": section,
            "train_s": round(trained, 1), "score_s": round(time.perf_counter() - scored, 1)}


def _result(argv: Sequence[str] | None, args: Any, source: Any, started: float,
            runs: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    summary = summarize(runs)
    return {"command": command_line("bench.box_study", argv),
            "data": {"source": source.source, "path": str(source.path)},
            "settings": {"image_size": args.image_size, "epochs": args.epochs, "seeds": args.seeds,
                         "box_loss_weights": [0.0, *args.weights], "batch_size": args.batch_size, "pretrained": "none",
                         "device": args.device},
            "machine": machine_info(torch.device(args.device)), "load_average": list(os.getloadavg()),
            "wall_s": round(time.time() - started, 1), "summary": summary, "targets": targets(summary),
            "runs": runs}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant (no head / head): balanced accuracy and each box's figures as mean +- sd over the seeds;
    the paired balanced-accuracy difference."""
    from scipy import stats

    out: dict[str, Any] = {}
    weights = sorted({r["box_loss_weight"] for r in runs})
    for weight in weights:
        mine = [r for r in runs if r["box_loss_weight"] == weight]
        entry: dict[str, Any] = {"test_balanced_accuracy": mean_sd([r["test_balanced_accuracy"] for r in mine]),
                                 "test_auc": mean_sd([r["test_auc"] for r in mine]), "boxes": {}}
        for kind in KINDS:
            found = [r["localisation"]["boxes"][kind] for r in mine if kind in r["localisation"]["boxes"]]
            if found:
                entry["boxes"][kind] = {key: mean_sd([f[key] for f in found]) for key in FIGURES}
        entry["max_box_acc"] = mean_sd([r["localisation"]["max_box_acc"]["max_box_acc"] for r in mine])
        entry["max_box_acc_v2"] = mean_sd([r["localisation"]["max_box_acc"]["max_box_acc_v2"] for r in mine])
        out[variant_name(weight)] = entry
    by = {(r["box_loss_weight"], r["seed"]): r for r in runs}
    for weight in weights[1:]:
        diffs = [by[(weight, s)]["test_balanced_accuracy"] - by[(0.0, s)]["test_balanced_accuracy"]
                 for s in sorted({r["seed"] for r in runs}) if (weight, s) in by and (0.0, s) in by]
        out[variant_name(weight)]["test_balanced_accuracy_diff"] = {**mean_sd(diffs), "per_seed": diffs,
                                                                    "verdict": verdict(diffs, stats)}
    return out


def variant_name(weight: float) -> str:
    return f"head (box_loss_weight {weight:g})" if weight > 0 else "no head"


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured mean and met / missed."""
    out: dict[str, Any] = {}
    for variant, entry in summary.items():
        head = entry["boxes"].get("head")
        if not head:
            continue
        for key, target in TARGETS.items():
            value = head[key]["mean"]
            out[f"{variant}: head {key} >= {target}"] = {"measured": value, "met": value is not None and value >= target}
        diff = entry["test_balanced_accuracy_diff"]
        # one seed gives no spread: not judged (met None) rather than met
        out[f"{variant}: balanced accuracy not lower than without the head"] = {
            "measured": diff["mean"], "verdict": diff["verdict"],
            "met": None if diff["verdict"].startswith("n/a") else diff["verdict"] != "loss"}
    for variant, entry in summary.items():
        cam, prior = entry["boxes"].get("gradcam"), entry["boxes"].get("centre_prior")
        if cam and prior:
            out[f"Grad-CAM box ahead of the centre prior ({variant})"] = {
                "measured": [cam["mean_iou"]["mean"], prior["mean_iou"]["mean"]],
                "met": cam["mean_iou"]["mean"] > prior["mean_iou"]["mean"]}
    return out


def table(summary: dict[str, Any]) -> str:
    lines = ["| model | box | mean IoU | IoU >= 0.3 | IoU >= 0.5 | IoU >= 0.7 |", "|---|---|---|---|---|---|"]
    for variant, entry in summary.items():
        for kind, figures in entry["boxes"].items():
            lines.append(f"| {variant} | {kind} | " + " | ".join(cell(figures[key]) for key in FIGURES) + " |")
    lines += ["", "| model | test balanced accuracy | test macro AUC | Grad-CAM MaxBoxAcc | MaxBoxAcc (mean over IoU "
              "0.3/0.5/0.7) | balanced accuracy: head - no head |", "|---|---|---|---|---|---|"]
    for variant, entry in summary.items():
        diff = entry.get("test_balanced_accuracy_diff")
        lines.append(f"| {variant} | {cell(entry['test_balanced_accuracy'])} | {cell(entry['test_auc'])} | "
                     f"{cell(entry['max_box_acc'])} | {cell(entry['max_box_acc_v2'])} | "
                     + ("(baseline)" if diff is None else f"{cell(diff)}: {diff['verdict']}") + " |")
    return "\n".join(lines)


def targets_text(found: dict[str, Any]) -> str:
    words = {True: "met", False: "MISSED", None: "not judged"}
    return "\n".join(f"target {name}: {words[t['met']]} (measured {t['measured']})" for name, t in found.items())


def _run_line(run: dict[str, Any]) -> str:
    boxes = run["localisation"]["boxes"]
    parts = ", ".join(f"{kind} IoU {boxes[kind]['mean_iou']:.3f}" for kind in KINDS if kind in boxes)
    return (f"seed {run['seed']} box_loss_weight {run['box_loss_weight']:g}: test balanced accuracy "
            f"{run['test_balanced_accuracy']:.3f}, best epoch {run['best_epoch']}; {parts}; Grad-CAM threshold "
            f"{run['cam_fraction']:.2f}; trained {run['train_s']:.0f} s, scored {run['score_s']:.0f} s")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = study_parser("bench.box_study", __doc__, epochs=3)
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0],
                        help="box_loss_weight of the runs with the head, one run each (default 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every run trains")
    parser.add_argument("--runs", help="keep the run folders here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or not image_size_ok(args.image_size) or min(args.weights) <= 0:
        raise UserError("--epochs must be at least 1, --image-size in [%d, %d] and --weights above 0" % IMAGE_SIZES)
    return args


if __name__ == "__main__":
    run_cli(main)
