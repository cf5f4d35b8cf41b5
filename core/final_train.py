"""Retrain a sweep's best configuration, evaluate it on the held-out test split, explain it with Grad-CAM.

    python -m core.final_train results/<sweep>/best.json [--epochs N] [--set key=value ...] [--out DIR] [--tta]

Reads best.json (see core/best_file.py), checks that the dataset is still there and unchanged, and
trains on the sweep's own split (its splits.csv): the train split, with val for monitoring and for
choosing the epoch by ``select_metric``. With ``--train-on-val`` it trains on train+val and keeps the
last epoch (val then only shows training progress). The test split, which the sweep never saw, is
evaluated once at the end. The epochs default to those the sweep's trials were tuned at (the winning
config's own ``epochs``): a config tuned for short runs is not retrained for a long one unasked.

Before the test split is touched, the chosen model is calibrated on the validation split: a temperature
for single-view and one for TTA prediction, and the thresholds of the positive class's operating points
(``--positive-class``, default mel), all stored in model.pt for core.evaluate and core.predict. With
``--train-on-val`` nothing is held out, so nothing is fitted (never on training images). The test report
adds 95% bootstrap intervals over lesions, lesion-level results, calibration before and after, TTA against
no TTA (``--tta``), the operating points and results per metadata subgroup (core/clinical.py).

Writes into ``--out`` (default: ``final/`` beside best.json) the training run's files (core/train.py:
``config.json``, ``splits.csv``, ``metrics.csv``, ``run.json``, TensorBoard scalars), ``model.pt`` (the
chosen epoch, in core.model's format), ``metrics.json`` (test metrics, per class figures, confusion
matrix; core/evaluation.py), ``training_curves.png``, ``confusion_matrix.png``, ``roc_curves.png``,
``reliability_diagram.png``, ``gradcam_<class>.png`` and ``gradcam/`` (each overlay alone), ``report.md``, the
page to read first, and ``report.html`` (the same, one file with the figures inside; the sweep's own report.html
gains it as its final-model section). Running the command again resumes an interrupted training and
re-evaluates a finished one. ``metrics.json`` is written last and removed when a run starts, so a folder
holding one is complete. A damaged ``run.json`` or ``metrics.csv`` is written again from ``last.pt`` (with a
warning); a damaged ``best.pt``, ``last.pt`` or ``source.json`` is a one-line error saying to train again with
--no-resume.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core import filenames
from core.atomic import remove_stale_temps, write_json
from core.cli import add_evaluation_options, add_run_options, apply_threads, clinical_options
from core.errors import UserError, run_cli
from core.state_files import check_output_dir, read_json_state, reading

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"  # what this folder was trained from; guards a resume with other settings
# On a GPU a 224 px epoch of HAM10000 trains in well under a second, about what writing best.pt and last.pt
# takes: checkpoints every 30 s (and at the end) instead of every epoch; a resume repeats at most that much.
CHECKPOINT_EVERY_S = 30.0
# Retraining for more than this factor more (or fewer) epochs than the config was tuned at gets a warning.
EPOCH_MISMATCH = 1.5
# What to do when a file of an earlier final training in the folder is damaged.
FINAL_ADVICE = "train again with --no-resume, or use another --out"


@dataclass(frozen=True)
class FinalOptions:
    """How to retrain; everything else comes from best.json."""

    epochs: int | None = None            # None: the epochs the sweep's trials ran (the config's own)
    overrides: tuple[str, ...] = ()      # key=value config changes, applied after ``epochs``
    out_dir: str | Path | None = None    # None: final/ beside best.json
    train_on_val: bool = False           # train on train+val and keep the last epoch
    resume: bool = True
    gallery_per_class: int = 8
    progress: bool = True
    gradcam_layer: str | None = None     # None: chosen by image size (core.gradcam.choose_layer)
    gradcam_method: str | None = None    # None: core.gradcam.DEFAULT_METHOD
    evaluation: Any = None               # core.clinical.ClinicalOptions (TTA, calibration, ...); None: the defaults

    def gradcam(self) -> Any:
        """The Grad-CAM fields as a core.gradcam.GradcamOptions."""
        from core.gradcam import DEFAULT_METHOD, GradcamOptions

        return GradcamOptions(self.gallery_per_class, self.gradcam_layer, self.gradcam_method or DEFAULT_METHOD)


@dataclass(frozen=True)
class FinalResult:
    out_dir: Path
    metrics: dict[str, Any]   # the metrics.json document
    report: Path


def final_train(best_path: str | Path, options: FinalOptions = FinalOptions()) -> FinalResult:
    """Retrain, evaluate on the test split and write every output; see the module docstring."""
    from core.best_file import SPLITS_ADVICE, check_data, read_best
    from core.clinical import ClinicalOptions, evaluate_clinically, predict_set, write_reliability
    from core.config import TrainConfig
    from core.data import load_for_config
    from core.evaluation import evaluate_probs, explainable, metrics_document, write_figures
    from core.figures import curves_figure
    from core.inference import load_for_inference
    from core.model import save_model_file
    from core.operating_points import positive_index
    from core.report import update_sweep_page

    evaluation = options.evaluation or ClinicalOptions()
    started = time.perf_counter()
    best = read_best(best_path)
    tuned_epochs = best.config.epochs
    cfg = TrainConfig.from_dict({"epochs": tuned_epochs if options.epochs is None else options.epochs},
                                base=best.config)
    cfg = cfg.with_overrides(options.overrides)
    _warn_epoch_mismatch(cfg.epochs, tuned_epochs)
    check_data(best)
    out = check_output_dir(options.out_dir if options.out_dir is not None else best.folder / "final", "--out")
    train_splits = ("train", "val") if options.train_on_val else ("train",)
    _claim_folder(out, best, train_splits, options.resume)

    with reading(best.splits_file, SPLITS_ADVICE):
        data = load_for_config(best.data_path, cfg, splits_file=best.splits_file, progress=options.progress)
    test_idx = data.indices("test")
    if len(test_idx) == 0:
        raise UserError(f"{best.path}: the sweep's split has no test images (test_fraction="
                        f"{best.config.test_fraction}); nothing to evaluate the final model on")
    positive_index(data.class_names, evaluation.positive_class)  # a class the data lacks fails before training

    history, chosen_epoch = _train_or_reuse(cfg, data, out, train_splits, options)
    loaded = load_for_inference(out / filenames.BEST_CHECKPOINT, cfg.device, advice=FINAL_ADVICE)
    fitted = _fit_on_val(loaded, data, options.train_on_val, evaluation.positive_class)
    images = np.asarray(data.images[test_idx])
    log.info("evaluating epoch %d on the %d test images%s", chosen_epoch, len(test_idx),
             " (with and without TTA)" if evaluation.tta else "")
    predicted = predict_set(loaded, images, data, test_idx, data.labels[test_idx], evaluation.tta)
    clinical = evaluate_clinically(predicted, data.class_names, fitted, evaluation)
    ev = evaluate_probs(data.labels[test_idx], clinical.probs, data.class_names)

    chosen = history[chosen_epoch - 1]
    save_model_file(out / filenames.MODEL, loaded.model, data.class_names, cfg.to_dict(),
                    {"epoch": chosen_epoch, "metrics": {**chosen, **ev.metrics}, **fitted})
    curves_figure(history, out / "training_curves.png", best_epoch=chosen_epoch, title="Training curves"
                  + (" (trained on train+val: val is not held out)" if options.train_on_val else ""))
    figures, explained = write_figures(out, ev, "test split", loaded.model, loaded.device,
                                       explainable(ev, images, data, test_idx), options.gradcam())
    figures = [("Loss and metrics per epoch", "training_curves.png"), *figures,
               write_reliability(out, clinical, "test split")]

    counts = {split: int(len(data.indices(split))) for split in ("train", "val", "test")}
    document = metrics_document(ev, source={
        "model": str((out / filenames.MODEL).resolve()), "split": "test",
        "data": {"path": data.root, "layout": data.layout, "fingerprint": data.fingerprint,
                 "class_names": list(data.class_names)}}, training={
        "best_json": str(best.path.resolve()), "trial_id": best.trial_id,
        "sweep_metric": {"name": best.metric_name, "value": best.metric_value, "mode": best.metric_mode},
        "tuned_epochs": tuned_epochs, "epochs": cfg.epochs, "train_splits": list(train_splits),
        "split_sizes": counts, "chosen_epoch": chosen_epoch,
        "chosen_by": "last epoch" if options.train_on_val else cfg.select_metric, "epochs_run": len(history),
        "chosen_epoch_metrics": chosen, "device": str(loaded.device), "wall_s": time.perf_counter() - started},
        gradcam=explained.document, clinical=clinical.sections)
    _write_final_report(out, document, best, cfg, figures, explained)
    write_json(out / filenames.EVALUATION, document)  # last: the folder is complete once it is there
    update_sweep_page(best.folder, out)  # the sweep's report.html gains this final model's section
    return FinalResult(out_dir=out, metrics=document, report=out / filenames.REPORT)


def _fit_on_val(loaded: Any, data: Any, train_on_val: bool, positive_class: str | None) -> dict[str, Any]:
    """Calibration temperatures and operating thresholds chosen on the validation split (stored in model.pt)."""
    from core.clinical import fit_on_val, not_fitted, predict_set

    val_idx = data.indices("val")
    if train_on_val or len(val_idx) == 0:
        reason = ("trained on train+val, so no split is held out to fit on (never fitted on training images)"
                  if train_on_val else "the split has no validation images")
        log.warning("no calibration and no operating thresholds: %s", reason)
        return not_fitted(reason)
    log.info("calibrating on the %d validation images (single view and TTA) and choosing operating thresholds",
             len(val_idx))
    val = predict_set(loaded, np.asarray(data.images[val_idx]), data, val_idx, data.labels[val_idx], tta=True)
    return fit_on_val(val, data.class_names, positive_class)


def _warn_epoch_mismatch(epochs: int, tuned_epochs: int) -> None:
    if max(epochs, tuned_epochs) > EPOCH_MISMATCH * min(epochs, tuned_epochs):
        log.warning("the config was tuned with %d-epoch trials and is retrained for %d epochs: its regularisation "
                    "and learning rate may not suit that length (risk of %s; sweep at the length you retrain at)",
                    tuned_epochs, epochs, "over-fitting" if epochs > tuned_epochs else "under-training")


def _claim_folder(out: Path, best: Any, train_splits: tuple[str, ...], resume: bool) -> None:
    """Record where this folder's run comes from; refuse to resume one from other settings. Withdraws the
    folder's evaluation (a run killed from here on leaves none) and a killed run's temporary files."""
    source = {"best_json": str(best.path.resolve()), "trial_id": best.trial_id, "train_splits": list(train_splits)}
    remove_stale_temps(out, ("*", "gradcam/*"))
    (out / filenames.EVALUATION).unlink(missing_ok=True)
    previous = read_json_state(out / SOURCE_FILE, FINAL_ADVICE) if resume else None
    if previous and (out / filenames.LAST_CHECKPOINT).is_file():
        for key in ("best_json", "train_splits"):
            if previous.get(key) != source[key]:
                raise UserError(f"{out} holds a final training with another '{key}' ({previous.get(key)}); "
                                f"use another --out, or --no-resume to start over")
    write_json(out / SOURCE_FILE, source)


def _train_or_reuse(cfg: Any, data: Any, out: Path, train_splits: tuple[str, ...],
                    options: FinalOptions) -> tuple[list[dict[str, float]], int]:
    """Train (or resume); a folder whose training finished with this config is evaluated again as it is.

    Returns the history and the chosen epoch (the best by ``select_metric``, or the last on train+val),
    whose weights are in best.pt.
    """
    from core.train import RunOptions, train

    finished = _finished_training(out, cfg) if options.resume else None
    if finished is not None:
        log.info("%s already holds the finished training of this config: evaluating it again", out)
        return finished
    bar = EpochBar(cfg.epochs, options.progress)
    try:
        result = train(cfg, data, out, bar.on_epoch, RunOptions(
            resume=options.resume, progress=options.progress, train_splits=train_splits,
            checkpoint_every_s=CHECKPOINT_EVERY_S, keep_last=options.train_on_val))
    finally:
        bar.close()
    return result.history, result.best_epoch


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


def _write_final_report(out: Path, document: dict[str, Any], best: Any, cfg: Any, figures: list,
                        explained: Any) -> None:
    """report.md from the metrics.json document (so the page and the file never disagree)."""
    from core.clinical import headline_intervals, interval_note, report_tables
    from core.report import ReportInput, write_report

    run, data = document["training"], document["source"]["data"]
    counts, train_on_val = run["split_sizes"], "val" in run["train_splits"]
    chosen_by = "the last epoch" if train_on_val else f"best `{cfg.select_metric}`"
    facts = [
        ("source", f"`{best.path.resolve()}`, trial `{best.trial_id}` ({best.metric_name} = "
                   f"{best.metric_value:.4f} in the sweep)"),
        ("data", f"`{data['path']}` ({data['layout']} layout, {len(data['class_names'])} classes, fingerprint "
                 f"`{data['fingerprint'][:12]}`)"),
        ("split", f"{counts['train']} train / {counts['val']} val / {counts['test']} test images, the sweep's "
                  f"split (`{best.splits_file.name}`), grouped by lesion"),
        ("training", f"{run['epochs_run']} epochs on {' + '.join(run['train_splits'])} (the sweep's trials ran "
                     f"{run['tuned_epochs']}), {cfg.image_size} px, on {run['device']}; model = epoch "
                     f"{run['chosen_epoch']} ({chosen_by})"
                     + (f", an EMA of the weights (decay {cfg.ema_decay:g})" if cfg.ema_decay else "")),
        ("evaluated", f"{counts['test']} test images, never seen by the sweep; took {run['wall_s'] / 60:.1f} min "
                      f"in all"),
        ("model file", "`model.pt` (load with `core.model.load_model_file`)"),
    ]
    notes = []
    if train_on_val:
        notes.append("Trained on train+val: the validation curves are measured on training images and say nothing "
                     "of generalisation; the test metrics do.")
    notes += explained.notes
    model = out / filenames.MODEL
    metrics = {k: v for k, v in document.items() if k.startswith("test_")}
    write_report(out / filenames.REPORT, ReportInput(
        title=f"Final model of sweep {best.folder.name}", facts=facts, metrics=metrics,
        per_class=document["per_class"], figures=figures, galleries=explained.galleries, config=cfg.to_dict(),
        notes=notes, gradcam=document.get("gradcam"), intervals=headline_intervals(document),
        interval_note=interval_note(document), tables=report_tables(document),
        commands=[("Evaluate this model on another dataset (an external test set)",
                   f"python -m core.evaluate {model} --data PATH --split all --out {out / 'external'}"),
                  ("Predict images, with Grad-CAM overlays",
                   f"python -m core.predict {model} IMAGE... --gradcam {out / 'predictions'}"),
                  ("Curves in TensorBoard", f"tensorboard --logdir {out}")]))


def _finished_training(out: Path, cfg: Any) -> tuple[list[dict[str, float]], int] | None:
    """The history and chosen epoch of a training that finished in ``out`` with ``cfg``, else None.

    A damaged run.json or metrics.csv is None too, with a warning: the training then resumes from last.pt,
    which holds the whole history, and writes both again.
    """
    import pandas as pd

    from core.config import TrainConfig

    heal = "resuming from last.pt writes it again"
    try:
        done = read_json_state(out / filenames.RUN_STATE, heal) or {}
    except UserError as exc:
        log.warning("%s", exc)
        return None
    config = out / filenames.CONFIG
    if not (done.get("status") == "complete" and done.get("epochs_run") == cfg.epochs and config.is_file()
            and (out / filenames.BEST_CHECKPOINT).is_file()):
        return None
    with reading(config, FINAL_ADVICE):
        if TrainConfig.load(config) != cfg:
            return None
    path = out / filenames.METRICS_CSV
    try:
        with reading(path, heal, OSError, ValueError, KeyError, TypeError):
            history = pd.read_csv(path).to_dict("records")
            if len(history) != done["epochs_run"] or not 1 <= int(done["best_epoch"]) <= len(history):
                raise ValueError(f"{len(history)} rows, but run.json says {done['epochs_run']} epochs, the best "
                                 f"{done['best_epoch']}")
    except UserError as exc:
        log.warning("%s", exc)
        return None
    return history, int(done["best_epoch"])


def main(argv: Sequence[str] | None = None) -> int:
    from core.config import TrainConfig
    from core.evaluation import headline

    parser = argparse.ArgumentParser(
        prog="python -m core.final_train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="config keys (--set key=value):\n" + TrainConfig.describe())
    parser.add_argument("best", metavar="BEST_JSON", help="a sweep's best.json (results/<sweep>/best.json)")
    parser.add_argument("--epochs", type=int,
                        help="training epochs (default: the epochs the sweep's trials were tuned at)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the best config; repeatable (applied after --epochs)")
    parser.add_argument("--out", help="output folder (default: final/ beside best.json)")
    parser.add_argument("--train-on-val", action="store_true",
                        help="train on train+val and keep the last epoch (val no longer held out)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out holds a training")
    add_run_options(parser)
    add_evaluation_options(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    result = final_train(args.best, FinalOptions(
        epochs=args.epochs, overrides=tuple(args.overrides), out_dir=args.out, train_on_val=args.train_on_val,
        resume=not args.no_resume, gallery_per_class=args.gallery, gradcam_layer=args.gradcam_layer,
        gradcam_method=args.gradcam_method, evaluation=clinical_options(args)))
    training = result.metrics["training"]
    print(f"test ({result.metrics['n_images']} images, epoch {training['chosen_epoch']}): {headline(result.metrics)}")
    print(f"report: {result.report}")
    return 0


if __name__ == "__main__":
    run_cli(main)
