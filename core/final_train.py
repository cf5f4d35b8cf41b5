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
(``--positive-class``, default mel), the out-of-distribution check (core/model/ood.py) and the abstention rule for
``--coverage`` (core/model/abstain.py), all stored in model.pt for core.evaluate and core.predict. With
``--train-on-val`` nothing is held out, so nothing is fitted (never on training images). The test report
adds 95% bootstrap intervals over lesions, lesion-level results, calibration before and after, TTA against
no TTA (``--tta``), the operating points and results per metadata subgroup (core/evaluation/sections.py), and when not
to trust the answer: far-out and shifted images against each out-of-distribution score, and the risk-coverage
curve (core/evaluation/trust.py, ``risk_coverage.png``).

Writes into ``--out`` (default: ``final/`` beside best.json) the training run's files (core/train.py: ``config.json``,
``splits.csv``, ``metrics.csv``, ``run.json``, TensorBoard scalars), ``model.pt`` (the chosen epoch, in
core.model.networks's format), ``metrics.json`` (test metrics, per class figures, confusion matrix;
core/evaluation/pipeline.py), ``training_curves.png``, ``confusion_matrix.png``, ``roc_curves.png``,
``reliability_diagram.png``, ``gradcam_<class>.png`` and ``gradcam/`` (each overlay alone), ``boxes.png`` (where the
lesion is: core/evaluation/localisation.py; model.pt then also stores the Grad-CAM box's threshold, chosen on val, and
the training split's mean lesion box), ``report.md``, the page to read first, and ``report.html`` (the same, one file
with the figures inside; the sweep's own report.html gains it as its final-model section). Running the command again
resumes an interrupted training and re-evaluates a finished one. Where the sweep chose an ensemble (ensemble.json
beside best.json), it is then built from its members' checkpoints, calibrated on val and evaluated on test beside the
single model (core/final_ensemble.py: ``ensemble.pt``, ``ensemble/``, ``ensemble_comparison.json``). ``metrics.json``
is written last and removed when a run starts, so a folder holding one is complete. A damaged ``run.json`` or
``metrics.csv`` is written again from ``last.pt`` (with a warning); a damaged ``best.pt``, ``last.pt`` or
``source.json`` is a one-line error saying to train again with --no-resume.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from core import filenames
from core.io.atomic import remove_stale_temps, write_json
from core.best_file import SPLITS_ADVICE, BestFile, check_data, read_best
from core.cli import (add_coverage_option, add_evaluation_options, add_gallery_options, add_threads_option,
                      apply_threads, section_options, coverage_of)
from core.model.abstain import DEFAULT_COVERAGE
from core.evaluation.sections import SectionOptions, not_fitted
from core.config import TrainConfig
from core.data.dataset import Dataset, load_for_config
from core.errors import UserError, run_cli
from core.evaluation.pipeline import (EvaluatedImages, EvaluationOutputs, ReportPage, ScoredImages, data_source,
                                      fit_on_validation, score_images, write_evaluation)
from core.evaluation.evaluation_file import SweepMetric, TrainingRecord, figures_of, source_data_of, training_of
from core.evaluation.figures import curves_figure
from core.model.inference import LoadedModel
from core.model.loading import load_for_inference
from core.evaluation.metrics import headline
from core.model.networks import check_gradcam_layer, save_model_file
from core.evaluation.operating_points import positive_index
from core.progress import progress_bar
from core.evaluation.report import show_in_parent_page
from core.io.state_files import check_output_dir, read_json_state, reading
from core.io.storage import is_uri
from core.train import RunOptions, train

if TYPE_CHECKING:  # core.explain.gradcam imports Captum: only when Grad-CAM runs
    from core.explain.gradcam import GradcamOptions

log = logging.getLogger(__name__)

SOURCE_FILE = filenames.FINAL_SOURCE  # what this folder was trained from; guards a resume with other settings
# On a GPU a 224 px epoch of HAM10000 trains in well under a second, about what writing best.pt and last.pt
# takes: checkpoints every 30 s (and at the end) instead of every epoch; a resume repeats at most that much.
CHECKPOINT_EVERY_S = 30.0
# Retraining for more than this factor more (or fewer) epochs than the config was tuned at gets a warning.
EPOCH_MISMATCH = 1.5
# What to do when a file of an earlier final training in the folder is damaged.
FINAL_ADVICE = "train again with --no-resume, or use another --out"
CURVES_FIGURE = filenames.CURVES_FIGURE


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
    gradcam_layer: str | None = None     # None: chosen by image size (core.explain.gradcam.choose_layer)
    gradcam_method: str | None = None    # None: core.explain.gradcam.DEFAULT_METHOD
    evaluation: SectionOptions = SectionOptions()   # TTA, calibration, positive class, bootstrap
    coverage: float = DEFAULT_COVERAGE   # share of val images the abstention rule answers (core/model/abstain.py)

    def gradcam(self) -> GradcamOptions:
        """The Grad-CAM fields as a core.explain.gradcam.GradcamOptions."""
        from core.explain.gradcam import DEFAULT_METHOD, GradcamOptions

        return GradcamOptions(self.gallery_per_class, self.gradcam_layer, self.gradcam_method or DEFAULT_METHOD)


@dataclass(frozen=True)
class FinalResult:
    out_dir: Path
    metrics: dict[str, Any]   # the metrics.json document
    report: Path


@dataclass(frozen=True)
class FinalRun:
    """The final training in hand: where it came from, its config, data and folder, and how it went."""

    best: BestFile
    cfg: TrainConfig
    data: Dataset
    out: Path
    train_splits: tuple[str, ...]
    history: list[dict[str, float]]
    chosen_epoch: int
    started: float                # time.perf_counter() when the command started


def final_train(best_path: str | Path, options: FinalOptions = FinalOptions()) -> FinalResult:
    """Retrain, evaluate on the test split and write every output; see the module docstring."""
    started = time.perf_counter()
    best = read_best(best_path)
    cfg = TrainConfig.from_dict({"epochs": best.config.epochs if options.epochs is None else options.epochs},
                                base=best.config).with_overrides(options.overrides)
    _warn_epoch_mismatch(cfg.epochs, best.config.epochs)
    if options.gallery_per_class > 0:  # a layer the arch lacks fails now, not after the training
        check_gradcam_layer(cfg.arch, options.gradcam_layer)
    check_data(best)
    out = check_output_dir(best.folder / filenames.FINAL_DIR if options.out_dir is None else options.out_dir, "--out")
    train_splits = ("train", "val") if options.train_on_val else ("train",)
    _claim_folder(out, best, train_splits, options.resume)

    with reading(best.splits_file, SPLITS_ADVICE):
        data = load_for_config(best.data_path, cfg, splits_file=best.splits_file, progress=options.progress)
    test_idx = data.indices("test")
    if len(test_idx) == 0:
        raise UserError(f"{best.path}: the sweep's split has no test images (test_fraction="
                        f"{best.config.test_fraction}); nothing to evaluate the final model on")
    positive_index(data.class_names, options.evaluation.positive_class)  # a class the data lacks fails first

    history, chosen_epoch = _train_or_reuse(cfg, data, out, train_splits, options)
    run = FinalRun(best, cfg, data, out, train_splits, history, chosen_epoch, started)
    loaded = load_for_inference(out / filenames.BEST_CHECKPOINT, cfg.device, advice=FINAL_ADVICE)
    fitted = _fit_on_val(loaded, data, options.train_on_val, options.evaluation.positive_class, options.coverage)
    fitted["boxes"] = _fit_boxes(loaded, data, train_splits, options)
    log.info("evaluating epoch %d on the %d test images%s", chosen_epoch, len(test_idx),
             " (with and without TTA)" if options.evaluation.tta else "")
    scored = score_images(loaded, EvaluatedImages(data, test_idx, data.labels[test_idx], "test split"), fitted,
                          options.evaluation)
    # --- the sweep's ensemble (ensemble.json), side by side with the single model: core/final_ensemble.py ---
    from core.final_ensemble import ensemble_page, prepare_ensemble, write_ensemble

    ensemble = prepare_ensemble(best, cfg, data, scored, options.evaluation, options.progress, options.coverage)
    document = _write_outputs(run, scored, fitted, options, ensemble.notes() if ensemble else [])
    if ensemble is not None:
        log.info("writing the ensemble's evaluation into %s", out / filenames.ENSEMBLE_DIR)
        document["ensemble"] = write_ensemble(out, ensemble, options.gradcam(), ensemble_page(best, ensemble, out))
    # --- end of the ensemble's part ---
    # The sweep's report.html (where it has a slot for final/) shows this model without being rendered again.
    show_in_parent_page(out, best.folder)
    return FinalResult(out_dir=out, metrics=document, report=out / filenames.REPORT)


def _write_outputs(run: FinalRun, scored: ScoredImages, fitted: Mapping[str, Any],
                   options: FinalOptions, notes: Sequence[str] = ()) -> dict[str, Any]:
    """model.pt (with what was fitted on val), the training curves, then the evaluation's folder."""
    out, chosen = run.out, run.history[run.chosen_epoch - 1]
    save_model_file(out / filenames.MODEL, scored.loaded.model, run.data.class_names, run.cfg.to_dict(),
                    {"epoch": run.chosen_epoch, "metrics": {**chosen, **scored.scores.metrics}, **fitted})
    curves_figure(run.history, out / CURVES_FIGURE, best_epoch=run.chosen_epoch, title="Training curves"
                  + (" (trained on train+val: val is not held out)" if options.train_on_val else ""))
    source = {"model": str((out / filenames.MODEL).resolve()), "split": "test", "data": data_source(run.data)}
    return write_evaluation(out, scored, EvaluationOutputs(
        source=source, gradcam=options.gradcam(), training=_training_section(run, str(scored.loaded.device)),
        page=lambda document: _final_page(run, document, notes),
        figures=[("Loss and metrics per epoch", CURVES_FIGURE)]))


def _training_section(run: FinalRun, device: str) -> Callable[[], TrainingRecord]:
    """metrics.json's ``training``: made when the document is, so that ``wall_s`` counts the figures too."""
    best, cfg = run.best, run.cfg
    counts = {split: int(len(run.data.indices(split))) for split in ("train", "val", "test")}
    return lambda: TrainingRecord(
        best_json=str(best.path.resolve()), trial_id=best.trial_id,
        sweep_metric=SweepMetric(best.metric_name, best.metric_value, best.metric_mode),
        tuned_epochs=best.config.epochs, epochs=cfg.epochs, train_splits=run.train_splits, split_sizes=counts,
        chosen_epoch=run.chosen_epoch, chosen_by="last epoch" if "val" in run.train_splits else cfg.select_metric,
        epochs_run=len(run.history), chosen_epoch_metrics=run.history[run.chosen_epoch - 1], device=device,
        wall_s=time.perf_counter() - run.started)


def _fit_on_val(loaded: LoadedModel, data: Dataset, train_on_val: bool,
                positive_class: str | None, coverage: float = DEFAULT_COVERAGE) -> dict[str, Any]:
    """What model.pt stores, fitted on the validation split (core/evaluation/pipeline.py fit_on_validation); the
    reason where nothing can be."""
    val_idx = data.indices("val")
    if train_on_val or len(val_idx) == 0:
        reason = ("trained on train+val, so no split is held out to fit on (never fitted on training images)"
                  if train_on_val else "the split has no validation images")
        log.warning("no calibration and no operating thresholds: %s", reason)
        return not_fitted(reason)
    log.info("calibrating on the %d validation images (single view and TTA) and choosing operating thresholds",
             len(val_idx))
    return fit_on_validation(loaded, data, positive_class, coverage)


# --- lesion boxes (core/evaluation/localisation.py): the Grad-CAM box's threshold from val, the centre prior from train ---
def _fit_boxes(loaded: LoadedModel, data: Dataset, train_splits: tuple[str, ...],
               options: FinalOptions) -> dict[str, Any] | None:
    """model.pt's ``boxes``: the mean mask box of the training images (the centre prior) and the Grad-CAM box's
    threshold fraction, chosen on the validation images with a mask (the default where none is held out or
    Grad-CAM is off); None for a dataset without masks."""
    from core.evaluation.localisation import centre_prior, fit_boxes

    if data.masks is None:
        return None
    train_idx = np.concatenate([data.indices(s) for s in train_splits])
    prior = centre_prior(np.asarray(data.masks[train_idx]), np.asarray(data.has_mask)[train_idx])
    gradcam = options.gradcam()
    val_idx = data.indices("val")
    rows = val_idx[np.asarray(data.has_mask)[val_idx]] if not options.train_on_val else val_idx[:0]
    if gradcam.per_class <= 0 or len(rows) == 0:
        return fit_boxes(None, None, prior, None)
    from core.explain.gradcam import CAPTUM_NAMES, gradcam_maps
    from core.data.lesion_boxes import mask_boxes

    images, encoded = np.asarray(data.images[rows]), loaded.encode_dataset(data, rows)
    predicted = loaded.predict(images, clinical=encoded).argmax(1).tolist()
    log.info("choosing the Grad-CAM box's threshold on the %d validation images with a lesion mask", len(rows))
    maps = gradcam_maps(loaded.model, images, predicted, loaded.device, layer=gradcam.layer, method=gradcam.method,
                        clinical=encoded)
    truth, nonempty = mask_boxes(np.asarray(data.masks[rows]))
    keep = nonempty.numpy()
    return fit_boxes(maps[keep], truth.numpy()[keep], prior, CAPTUM_NAMES[gradcam.method])


def _warn_epoch_mismatch(epochs: int, tuned_epochs: int) -> None:
    if max(epochs, tuned_epochs) > EPOCH_MISMATCH * min(epochs, tuned_epochs):
        log.warning("the config was tuned with %d-epoch trials and is retrained for %d epochs: its regularisation "
                    "and learning rate may not suit that length (risk of %s; sweep at the length you retrain at)",
                    tuned_epochs, epochs, "over-fitting" if epochs > tuned_epochs else "under-training")


def _claim_folder(out: Path, best: BestFile, train_splits: tuple[str, ...], resume: bool) -> None:
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


def _train_or_reuse(cfg: TrainConfig, data: Dataset, out: Path, train_splits: tuple[str, ...],
                    options: FinalOptions) -> tuple[list[dict[str, float]], int]:
    """Train (or resume); a folder whose training finished with this config is evaluated again as it is.

    Returns the history and the chosen epoch (the best by ``select_metric``, or the last on train+val),
    whose weights are in best.pt.
    """
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
        self.bar = progress_bar(total=epochs, desc="final training", unit="epoch", enabled=enabled)

    def on_epoch(self, metrics: dict[str, float]) -> None:
        self.bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", val_loss=f"{metrics['val_loss']:.3f}",
                             val_bacc=f"{metrics['val_balanced_accuracy']:.3f}", val_auc=f"{metrics['val_auc']:.3f}",
                             refresh=False)
        self.bar.update(int(metrics["epoch"]) - self.bar.n)  # a resumed run starts past epoch 0

    def close(self) -> None:
        self.bar.close()


def _final_page(run: FinalRun, document: Mapping[str, Any], extra_notes: Sequence[str] = ()) -> ReportPage:
    """report.md's title, facts, notes and commands, from the metrics.json document (so they never disagree)."""
    best, cfg, out = run.best, run.cfg, run.out
    training, data = training_of(document), source_data_of(document)
    assert training is not None and data is not None, "written by _write_outputs just before"
    counts, train_on_val = training.split_sizes, training.trained_on_val
    chosen_by = "the last epoch" if train_on_val else f"best `{training.chosen_by}`"
    facts = [
        ("source", f"`{best.path.resolve()}`, trial `{best.trial_id}` ({best.metric_name} = "
                   f"{best.metric_value:.4f} in the sweep)"),
        ("data", f"`{data.path}` ({data.layout} layout, {len(data.class_names)} classes, fingerprint "
                 f"`{data.fingerprint[:12]}`)"),
        ("split", f"{counts['train']} train / {counts['val']} val / {counts['test']} test images, the sweep's "
                  f"split (`{best.splits_file.name}`), grouped by lesion"),
        ("training", f"{training.epochs_run} epochs on {' + '.join(training.train_splits)} (the sweep's "
                     f"trials ran {training.tuned_epochs}), {cfg.image_size} px, on {training.device}; model = "
                     f"epoch {training.chosen_epoch} ({chosen_by})"
                     + (f", an EMA of the weights (decay {cfg.ema_decay:g})" if cfg.ema_decay else "")),
        ("evaluated", f"{counts['test']} test images, never seen by the sweep; took {training.wall_s / 60:.1f} "
                      f"min in all"),
        ("model file", "`model.pt` (load with `core.model.networks.load_model_file`)"),
    ]
    notes = ["Trained on train+val: the validation curves are measured on training images and say nothing of "
             "generalisation; the test metrics do."] if train_on_val else []
    notes += list(extra_notes)  # the ensemble's comparison (core/final_ensemble.py)
    model = out / filenames.MODEL
    return ReportPage(
        title=f"Final model of sweep {best.folder.name}", facts=facts, notes=notes, config=cfg.to_dict(),
        commands=[("Evaluate this model on another dataset (an external test set)",
                   f"python -m core.evaluate {model} --data PATH --split all --out {out / 'external'}"),
                  ("Predict images, with Grad-CAM overlays",
                   f"python -m core.predict {model} IMAGE... --gradcam {out / 'predictions'}"),
                  ("Curves in TensorBoard", f"tensorboard --logdir {out}")])


def _finished_training(out: Path, cfg: TrainConfig) -> tuple[list[dict[str, float]], int] | None:
    """The history and chosen epoch of a training that finished in ``out`` with ``cfg``, else None.

    A damaged run.json or metrics.csv is None too, with a warning: the training then resumes from last.pt,
    which holds the whole history, and writes both again.
    """
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
    parser = argparse.ArgumentParser(
        prog="python -m core.final_train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="config keys (--set key=value):\n" + TrainConfig.describe())
    parser.add_argument("best", metavar="BEST_JSON", help="a sweep's best.json (results/<sweep>/best.json), or "
                                                         "s3://bucket/prefix/<sweep>/best.json: final/ then goes "
                                                         "into the bucket beside it (core/final_storage.py)")
    parser.add_argument("--epochs", type=int,
                        help="training epochs (default: the epochs the sweep's trials were tuned at)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the best config; repeatable (applied after --epochs)")
    parser.add_argument("--out", help="output folder (default: final/ beside best.json)")
    parser.add_argument("--train-on-val", action="store_true",
                        help="train on train+val and keep the last epoch (val no longer held out)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out holds a training")
    parser.add_argument("--storage-endpoint", metavar="URL", help="with an s3:// BEST_JSON: URL of an "
                                                                   "S3-compatible server (default: AWS_ENDPOINT_URL)")
    add_gallery_options(parser)
    add_threads_option(parser)
    add_evaluation_options(parser)
    add_coverage_option(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    options = FinalOptions(
        epochs=args.epochs, overrides=tuple(args.overrides), out_dir=args.out, train_on_val=args.train_on_val,
        resume=not args.no_resume, gallery_per_class=args.gallery, gradcam_layer=args.gradcam_layer,
        gradcam_method=args.gradcam_method, evaluation=section_options(args), coverage=coverage_of(args))
    if is_uri(args.best):
        from core.final_storage import final_train_in_bucket

        result, report = final_train_in_bucket(args.best, args.storage_endpoint, args.out,
                                               lambda best, out: final_train(best, replace(options, out_dir=out)))
        report = f"{report}/{filenames.REPORT}"
    else:
        result = final_train(args.best, options)
        report = str(result.report)
    training, figures = training_of(result.metrics), figures_of(result.metrics)
    epoch = f", epoch {training.chosen_epoch}" if training else ""
    print(f"test ({figures.n_images} images{epoch}): {headline(result.metrics)}")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    run_cli(main)
