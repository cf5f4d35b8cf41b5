"""Evaluate a saved model on a dataset: metrics.json, figures, Grad-CAM galleries and report.md.

    python -m core.evaluate results/<sweep>/final/model.pt --data PATH --out DIR [--split test|all]

The dataset may be any supported layout (HAM10000, ISIC 2018 Task 3, ImageFolder), e.g. an external
test set (then use ``--split all``). Its classes are matched to the model's by name: a subset is
fine, a class the model does not know is an error. Images are decoded at the model's image size and
normalised as in training. ``--split test`` evaluates the test split made with the model's split
settings (pass ``--splits`` with the run's splits.csv to reuse a split exactly).

``core.final_train`` writes its test evaluation with the same functions.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix

from core.atomic import write_json
from core.errors import UserError, run_cli

log = logging.getLogger(__name__)

EVALUATION_FORMAT = "lesion-sweep/evaluation"


@dataclass(frozen=True)
class Evaluation:
    """Predictions of a model on labelled images and the metrics they give (classes: the model's)."""

    class_names: tuple[str, ...]
    labels: np.ndarray            # int64 [N], index into class_names
    probs: np.ndarray             # float [N, C]
    metrics: dict[str, float]     # test_accuracy, test_balanced_accuracy, test_macro_f1, test_auc, test_loss
    per_class: dict[str, dict[str, float]]
    confusion: np.ndarray         # int64 [C, C], rows true, columns predicted


def evaluate_probs(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> Evaluation:
    """Metrics of predicted probabilities against labels; the loss is the plain cross-entropy."""
    from core.metrics import classification_metrics, per_class_report

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise UserError("nothing to evaluate: the chosen split holds no images")
    picked = probs[np.arange(len(labels)), labels]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-12, None))))
    return Evaluation(class_names=tuple(class_names), labels=labels, probs=probs,
                      metrics=classification_metrics(labels, probs, "test_", loss),
                      per_class=per_class_report(labels, probs, class_names),
                      confusion=confusion_matrix(labels, probs.argmax(1), labels=np.arange(len(class_names))))


def map_labels(data_classes: Sequence[str], model_classes: Sequence[str], labels: np.ndarray,
               source: str) -> np.ndarray:
    """Labels indexing ``data_classes`` -> the same classes' indices in ``model_classes``, by name."""
    index = {name: i for i, name in enumerate(model_classes)}
    used = sorted({data_classes[i] for i in np.unique(labels)})
    unknown = [name for name in used if name not in index]
    if unknown:
        raise UserError(f"{source}: classes the model does not know: {', '.join(unknown)} "
                        f"(the model's classes: {', '.join(model_classes)})")
    lookup = np.array([index.get(name, -1) for name in data_classes], dtype=np.int64)
    return lookup[np.asarray(labels, dtype=np.int64)]


def metrics_document(ev: Evaluation, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What metrics.json holds: the flat test_* metrics, per class figures, the confusion matrix."""
    return {**dict(extra or {}), **{k: _finite_or_none(v) for k, v in ev.metrics.items()},
            "n_images": int(len(ev.labels)), "class_names": list(ev.class_names),
            "per_class": ev.per_class, "confusion_matrix": ev.confusion.tolist()}


def write_figures(out: Path, ev: Evaluation, model: Any, images_uint8: np.ndarray, image_ids: Sequence[str],
                  device: Any, gallery_per_class: int, what: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Confusion matrix, ROC curves and Grad-CAM galleries into ``out``; returns (figures, galleries)."""
    from core.figures import confusion_matrix_figure, roc_figure
    from core.gradcam import write_galleries

    confusion_matrix_figure(ev.confusion, ev.class_names, out / "confusion_matrix.png",
                            title=f"Confusion matrix, {what}")
    roc_figure(ev.labels, ev.probs, ev.class_names, out / "roc_curves.png",
               title=f"ROC curves, {what} (one class vs the rest)")
    figures = [("Confusion matrix", "confusion_matrix.png"), ("ROC curves", "roc_curves.png")]
    if gallery_per_class > 0:
        log.info("Grad-CAM galleries (%d examples per class)", gallery_per_class)
    galleries = write_galleries(model, images_uint8, ev.labels, ev.probs, image_ids, ev.class_names, out,
                                device=device, per_class=gallery_per_class)
    return figures, galleries


def load_for_inference(checkpoint: str | os.PathLike, device: str) -> tuple[Any, dict[str, Any], Any, Any]:
    """(model on its device in eval mode, its metadata, its TrainConfig with ``device``, the torch device)."""
    from core.config import TrainConfig
    from core.model import load_model_file
    from core.train import resolve_device

    model, meta = load_model_file(checkpoint)
    try:
        cfg = replace(TrainConfig.from_dict(meta.get("config") or {}), device=device)
    except UserError as exc:
        raise UserError(f"{checkpoint}: the model's config is not valid here ({exc})") from None
    torch_device = resolve_device(cfg)
    return model.to(torch_device), meta, cfg, torch_device


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--gallery and --threads, shared by core.evaluate and core.final_train."""
    parser.add_argument("--gallery", type=int, default=8, metavar="N",
                        help="Grad-CAM examples per class (default 8; 0: no galleries)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def apply_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def headline(metrics: Mapping[str, float]) -> str:
    """One console line of the main metrics."""
    keys = ("test_balanced_accuracy", "test_accuracy", "test_macro_f1", "test_auc", "test_loss")
    return ", ".join(f"{k.removeprefix('test_')}={_fmt(metrics.get(k))}" for k in keys)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)  # JSON has no NaN (an AUC with one class present)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="Writes metrics.json, confusion_matrix.png, roc_curves.png, gradcam_<class>.png, gradcam/ and "
               "report.md into --out.\n\nexample:\n  python -m core.evaluate results/demo/final/model.pt "
               "--data ../isic2018-test --split all --out results/demo/external")
    parser.add_argument("checkpoint", help="a model file (model.pt of core.final_train, best.pt of core.train)")
    parser.add_argument("--data", required=True, help="dataset folder (or CSV) in a supported layout")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", choices=("test", "all"), default="test",
                        help="the test split only (default) or every image (an external test set)")
    parser.add_argument("--splits", help="a splits.csv to take the split from (e.g. the training run's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_run_options(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)

    from core.data import load_dataset
    from core.gradcam import coarse_map_note
    from core.report import ReportInput, write_report
    from core.train import predict_probs

    model, meta, cfg, device = load_for_inference(args.checkpoint, args.device)
    model_classes = tuple(meta["class_names"])
    # --split all needs no test split: asking for one would fail on a small external set for no reason.
    test_fraction = cfg.test_fraction if args.split == "test" else 0.0
    data = load_dataset(args.data, cfg.image_size, val_fraction=cfg.val_fraction, test_fraction=test_fraction,
                        split_seed=cfg.split_seed, splits_file=args.splits)
    idx = np.arange(len(data.labels)) if args.split == "all" else data.indices("test")
    if len(idx) == 0:
        raise UserError(f"{args.data}: the test split is empty; use --split all for a dataset held out as a whole")
    labels = map_labels(data.class_names, model_classes, data.labels[idx], args.data)
    images = np.asarray(data.images[idx])
    log.info("evaluating %s on %d images of %s (%s split)", args.checkpoint, len(idx), data.root, args.split)
    probs = predict_probs(model, images, device, cfg.eval_batch_size, cfg.precision)
    ev = evaluate_probs(labels, probs, model_classes)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    what = f"{args.split} split of {Path(data.root).name}" if args.split == "test" else f"all of {Path(data.root).name}"
    figures, galleries = write_figures(out, ev, model, images, data.image_ids[idx], device, args.gallery, what)
    source = {"model": str(Path(args.checkpoint).resolve()), "split": args.split,
              "data": {"path": data.root, "layout": data.layout, "fingerprint": data.fingerprint,
                       "class_names": list(data.class_names)}}
    write_json(out / "metrics.json", {"format": EVALUATION_FORMAT, "version": 1,
                                      **metrics_document(ev, source)})
    write_report(out / "report.md", ReportInput(
        title=f"Evaluation of {Path(args.checkpoint).name} on {Path(data.root).name}",
        facts=[("model", f"`{source['model']}` (epoch {meta.get('epoch', '?')}, {len(model_classes)} classes, "
                         f"{meta['image_size']} px)"),
               ("data", f"`{data.root}` ({data.layout} layout, fingerprint `{data.fingerprint[:12]}`)"),
               ("evaluated", f"{len(idx)} images ({args.split} split)"),
               ("classes matched by name", ", ".join(sorted({data.class_names[i] for i in
                                                               np.unique(data.labels[idx])})))],
        metrics=ev.metrics, per_class=ev.per_class, figures=figures, galleries=galleries,
        config=meta.get("config"), notes=[note for note in [coarse_map_note(cfg.image_size)] if galleries and note]))
    print(headline(ev.metrics))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
