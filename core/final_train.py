"""Retrain a sweep's best configuration, evaluate it on the held-out test split, explain it with Grad-CAM.

    python -m core.final_train results/<sweep>/best.json [--epochs 50] [--set key=value ...] [--out DIR]

Reads best.json (see core/best_file.py), checks that the dataset is still there and unchanged, and
trains on the sweep's own split (its splits.csv): the train split, with val for monitoring and for
choosing the epoch by ``select_metric``. With ``--train-on-val`` it trains on train+val and keeps the
last epoch (val then only shows training progress). The test split, which the sweep never saw, is
evaluated once at the end.

Writes into ``--out`` (default: ``final/`` beside best.json): ``model.pt`` (the chosen epoch, in
core.model's format), ``config.json``, ``splits.csv``, ``metrics.csv`` (per epoch), TensorBoard
scalars, ``metrics.json`` (test metrics, per class figures, confusion matrix), ``training_curves.png``,
``confusion_matrix.png``, ``roc_curves.png``, ``gradcam_<class>.png`` and ``gradcam/`` (each overlay
alone), and ``report.md``, the page to read first. Running the command again resumes an interrupted
training and re-evaluates a finished one.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.atomic import write_json
from core.errors import UserError, run_cli

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"  # what this folder was trained from; guards a resume with other settings
# On a GPU a 224 px epoch of HAM10000 trains in well under a second, about what writing best.pt and last.pt
# takes: checkpoints every 30 s (and at the end) instead of every epoch; a resume repeats at most that much.
CHECKPOINT_EVERY_S = 30.0


@dataclass(frozen=True)
class FinalResult:
    out_dir: Path
    metrics: dict[str, Any]   # the metrics.json document
    report: Path


def final_train(best_path: str | Path, *, epochs: int = 50, overrides: Sequence[str] = (),
                out_dir: str | Path | None = None, train_on_val: bool = False, resume: bool = True,
                gallery_per_class: int = 8, progress: bool = True) -> FinalResult:
    """Retrain, evaluate on the test split and write every output; see the module docstring."""
    from core.best_file import check_data, read_best
    from core.config import TrainConfig
    from core.data import load_for_config

    started = time.perf_counter()
    best = read_best(best_path)
    cfg = TrainConfig.from_dict({"epochs": epochs}, base=best.config).with_overrides(overrides)
    check_data(best)
    out = Path(out_dir) if out_dir is not None else best.folder / "final"
    train_splits = ("train", "val") if train_on_val else ("train",)
    _claim_folder(out, best, train_splits, resume)

    data = load_for_config(best.data_path, cfg, splits_file=best.splits_file, progress=progress)
    test_idx = data.indices("test")
    if len(test_idx) == 0:
        raise UserError(f"{best.path}: the sweep's split has no test images (test_fraction="
                        f"{best.config.test_fraction}); nothing to evaluate the final model on")

    history, chosen_epoch, device = _train_or_reuse(cfg, data, out, train_splits, resume, progress)
    model = _chosen_model(out, cfg, data.class_names, train_on_val, device)
    chosen = history[chosen_epoch - 1]

    from core.evaluate import evaluate_probs, metrics_document, write_figures
    from core.figures import curves_figure
    from core.model import save_model_file
    from core.train import predict_probs

    images = np.asarray(data.images[test_idx])
    log.info("evaluating epoch %d on the %d test images", chosen_epoch, len(test_idx))
    probs = predict_probs(model, images, device, cfg.eval_batch_size, cfg.precision)
    ev = evaluate_probs(data.labels[test_idx], probs, data.class_names)

    save_model_file(out / "model.pt", model, data.class_names, cfg.to_dict(),
                    {"epoch": chosen_epoch, "metrics": {**chosen, **ev.metrics}})
    curves_figure(history, out / "training_curves.png", best_epoch=chosen_epoch,
                  title="Training curves" + (" (trained on train+val: val is not held out)" if train_on_val else ""))
    figures, galleries = write_figures(out, ev, model, images, data.image_ids[test_idx], device,
                                       gallery_per_class, "test split")
    figures = [("Loss and metrics per epoch", "training_curves.png"), *figures]

    train_doc = _read_json(out / "metrics.json")
    counts = {split: int(len(data.indices(split))) for split in ("train", "val", "test")}
    document = metrics_document(ev, {
        "format": "lesion-sweep/final", "version": 1, "status": "complete",
        "best_json": str(best.path.resolve()), "trial_id": best.trial_id,
        "sweep_metric": {"name": best.metric_name, "value": best.metric_value, "mode": best.metric_mode},
        "train_splits": list(train_splits), "split_sizes": counts,
        "chosen_epoch": chosen_epoch, "chosen_by": "last epoch" if train_on_val else cfg.select_metric,
        "epochs_run": len(history), "best_epoch": int(train_doc.get("best_epoch", chosen_epoch)),
        "chosen_epoch_metrics": chosen,
        "data": {"path": data.root, "layout": data.layout, "fingerprint": data.fingerprint},
    })
    write_json(out / "metrics.json", document)

    from core.report import ReportInput, write_report

    elapsed = time.perf_counter() - started
    write_report(out / "report.md", ReportInput(
        title=f"Final model of sweep {best.folder.name}",
        facts=_facts(best, data, counts, train_splits, chosen_epoch, len(history), cfg, device, elapsed),
        metrics=ev.metrics, per_class=ev.per_class, figures=figures, galleries=galleries,
        config=cfg.to_dict(), notes=_notes(train_on_val, cfg.image_size if galleries else None),
        commands=[("Evaluate this model on another dataset (an external test set)",
                   f"python -m core.evaluate {out / 'model.pt'} --data PATH --split all --out {out / 'external'}"),
                  ("Predict images, with Grad-CAM overlays",
                   f"python -m core.predict {out / 'model.pt'} IMAGE... --gradcam {out / 'predictions'}"),
                  ("Curves in TensorBoard", f"tensorboard --logdir {out}")]))
    return FinalResult(out_dir=out, metrics=document, report=out / "report.md")


def _claim_folder(out: Path, best: Any, train_splits: tuple[str, ...], resume: bool) -> None:
    """Record where this folder's run comes from; refuse to resume one from other settings."""
    source = {"best_json": str(best.path.resolve()), "trial_id": best.trial_id, "train_splits": list(train_splits)}
    previous = _read_json(out / SOURCE_FILE)
    if resume and previous and (out / "last.pt").is_file():
        for key in ("best_json", "train_splits"):
            if previous.get(key) != source[key]:
                raise UserError(f"{out} holds a final training with another '{key}' ({previous.get(key)}); "
                                f"use another --out, or --no-resume to start over")
    write_json(out / SOURCE_FILE, source)


def _train_or_reuse(cfg: Any, data: Any, out: Path, train_splits: tuple[str, ...], resume: bool,
                    progress: bool) -> tuple[list[dict[str, float]], int, Any]:
    """Train (or resume); a folder whose training finished with this config is evaluated again as it is."""
    from core.config import TrainConfig
    from core.train import resolve_device, train

    device = resolve_device(cfg)
    done = _read_json(out / "metrics.json")
    if (resume and done.get("status") == "complete" and done.get("epochs_run") == cfg.epochs
            and (out / "config.json").is_file() and TrainConfig.load(out / "config.json") == cfg
            and (out / "last.pt").is_file() and (out / "best.pt").is_file()):
        import pandas as pd

        log.info("%s already holds the finished training of this config: evaluating it again", out)
        history = pd.read_csv(out / "metrics.csv").to_dict("records")
        best_epoch = int(done["best_epoch"])
    else:
        bar = EpochBar(cfg.epochs, progress)
        try:
            result = train(cfg, data, out, bar.on_epoch, resume=resume, progress=progress, train_splits=train_splits,
                           checkpoint_every_s=CHECKPOINT_EVERY_S)
        finally:
            bar.close()
        history, best_epoch = result.history, result.best_epoch
    chosen = len(history) if "val" in train_splits else best_epoch
    return history, chosen, device


class EpochBar:
    """An outer progress bar over epochs showing the losses and validation metrics of the last one."""

    def __init__(self, epochs: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=epochs, desc="final training", unit="epoch", disable=not enabled, dynamic_ncols=True)

    def on_epoch(self, metrics: dict[str, float]) -> None:
        self.bar.n = int(metrics["epoch"])
        self.bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", val_loss=f"{metrics['val_loss']:.3f}",
                             val_bacc=f"{metrics['val_balanced_accuracy']:.3f}", val_auc=f"{metrics['val_auc']:.3f}")

    def close(self) -> None:
        self.bar.close()


def _chosen_model(out: Path, cfg: Any, class_names: tuple[str, ...], last_epoch: bool, device: Any) -> Any:
    """The epoch chosen on val (best.pt) or, trained on train+val, the last one (from last.pt)."""
    import torch

    from core.model import build_model, load_model_file

    if not last_epoch:
        model, _ = load_model_file(out / "best.pt", device)
        return model
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    model = build_model(len(class_names), "none")
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def _facts(best: Any, data: Any, counts: dict[str, int], train_splits: tuple[str, ...], chosen_epoch: int,
           epochs_run: int, cfg: Any, device: Any, elapsed: float) -> list[tuple[str, str]]:
    chosen_by = "the last epoch" if "val" in train_splits else f"best `{cfg.select_metric}`"
    return [
        ("source", f"`{best.path.resolve()}`, trial `{best.trial_id}` ({best.metric_name} = "
                   f"{best.metric_value:.4f} in the sweep)"),
        ("data", f"`{data.root}` ({data.layout} layout, {len(data.class_names)} classes, fingerprint "
                 f"`{data.fingerprint[:12]}`)"),
        ("split", f"{counts['train']} train / {counts['val']} val / {counts['test']} test images, the sweep's "
                  f"split (`{best.splits_file.name}`), grouped by lesion"),
        ("training", f"{epochs_run} epochs on {' + '.join(train_splits)}, {cfg.image_size} px, on {device}; "
                     f"model = epoch {chosen_epoch} ({chosen_by})"),
        ("evaluated", f"{counts['test']} test images, never seen by the sweep; took {elapsed / 60:.1f} min in all"),
        ("model file", "`model.pt` (load with `core.model.load_model_file`)"),
    ]


def _notes(train_on_val: bool, gallery_image_size: int | None) -> list[str]:
    from core.gradcam import coarse_map_note

    notes = []
    if train_on_val:
        notes.append("Trained on train+val: the validation curves are measured on training images and say nothing "
                     "of generalisation; the test metrics do.")
    if gallery_image_size and coarse_map_note(gallery_image_size):
        notes.append(coarse_map_note(gallery_image_size))
    return notes


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def main(argv: Sequence[str] | None = None) -> int:
    from core.config import TrainConfig
    from core.evaluate import add_run_options, apply_threads, headline

    parser = argparse.ArgumentParser(
        prog="python -m core.final_train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="config keys (--set key=value):\n" + TrainConfig.describe())
    parser.add_argument("best", metavar="BEST_JSON", help="a sweep's best.json (results/<sweep>/best.json)")
    parser.add_argument("--epochs", type=int, default=50, help="training epochs (default 50)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the best config; repeatable (applied after --epochs)")
    parser.add_argument("--out", help="output folder (default: final/ beside best.json)")
    parser.add_argument("--train-on-val", action="store_true",
                        help="train on train+val and keep the last epoch (val no longer held out)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out holds a training")
    add_run_options(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    result = final_train(args.best, epochs=args.epochs, overrides=args.overrides, out_dir=args.out,
                         train_on_val=args.train_on_val, resume=not args.no_resume, gallery_per_class=args.gallery)
    print(f"test ({result.metrics['n_images']} images, epoch {result.metrics['chosen_epoch']}): "
          f"{headline(result.metrics)}")
    print(f"report: {result.report}")
    return 0


if __name__ == "__main__":
    run_cli(main)
