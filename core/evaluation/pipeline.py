"""One evaluation of a model on labelled images, the pipeline core.final_train and core.evaluate both run:
predict, calibrate, evaluation sections, metrics, figures, Grad-CAM, lesion boxes (core/evaluation/localisation.py),
report.md/report.html and metrics.json.

A library, not a command. Two steps, so that core.final_train can store what the first found in model.pt
before the second writes the folder::

    scored = score_images(loaded, EvaluatedImages(data, idx, labels, "test split"), stored, options)
    document = write_evaluation(out, scored, EvaluationOutputs(source=..., page=..., gradcam=...))

Both commands' metrics.json (format ``lesion-sweep/evaluation``), figures and report.md are therefore the same;
what differs (the report's title, facts and commands, core.final_train's ``training`` section and training
curves) is passed in :class:`EvaluationOutputs`.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from core import filenames
from core.io.atomic import write_json
from core.evaluation import localisation
from core.model.box_head import capture_boxes
from core.explain.cam_boxes import cam_boxes
from core.evaluation.sections import SectionOptions, SectionResults, EvaluatedSet, fit_on_val, section_results
from core.data.dataset import Dataset
from core.evaluation.figures import confusion_matrix_figure, reliability_figure, roc_figure
from core.model.ensemble import EnsembleModel
from core.model.inference import SINGLE_MODE, TTA_MODE, LoadedModel
from core.evaluation.metrics import PredictionScores, score_predictions
from core.evaluation.evaluation_file import SourceData, TrainingRecord
from core.metric_names import finite_or_none
from core.evaluation.report import ReportInput, write_evaluation_report
from core.evaluation.tables import headline_intervals, interval_note, report_tables
from core.model.abstain import DEFAULT_COVERAGE
from core.model.checked_prediction import fit_checks
from core.model.ood import Captured, capture
from core.evaluation.trust import RISK_COVERAGE_FIGURE, Evaluated, risk_coverage_figure, trust_sections, trust_tables

if TYPE_CHECKING:  # core.explain.gradcam imports Captum: only when Grad-CAM runs
    from core.explain.gradcam import Explainable, GradcamOptions

log = logging.getLogger(__name__)

EVALUATION_FORMAT = "lesion-sweep/evaluation"
CONFUSION_FIGURE, ROC_FIGURE, RELIABILITY_FIGURE = (filenames.CONFUSION_FIGURE, filenames.ROC_FIGURE,
                                                 filenames.RELIABILITY_FIGURE)


@dataclass(frozen=True)
class EvaluatedImages:
    """Which images of a dataset are evaluated, their labels as the model's classes, and what to call them."""

    data: Dataset
    idx: np.ndarray               # indices into data
    labels: np.ndarray            # int64 [len(idx)], index into the model's classes
    what: str                     # in figure titles: "test split", "all of ISIC2018"


@dataclass(frozen=True)
class ScoredImages:
    """What :func:`score_images` found; :func:`write_evaluation` writes it out."""

    loaded: LoadedModel
    images: EvaluatedImages
    pixels: np.ndarray            # uint8 [N, 3, S, S] of the evaluated images
    results: SectionResults
    scores: PredictionScores
    clinical: np.ndarray | None = None  # their encoded clinical fields (a fused model), as predicted with
    boxes: np.ndarray | None = None     # the box head's boxes [N, 4] (fractions), None without a head
    captured: Captured = field(default_factory=Captured)  # the single view's features and logits (core/model/ood.py)
    stored: Mapping[str, Any] = field(default_factory=dict)  # what model.pt stores (ood, abstention, ...)
    disagreement: Mapping[str, np.ndarray] = field(default_factory=dict)  # an ensemble's, per view (else empty)


@dataclass(frozen=True)
class ReportPage:
    """What a command's report.md says beyond the evaluation: its title, facts, notes, commands and config."""

    title: str
    facts: Sequence[tuple[str, str]]
    notes: Sequence[str] = ()
    commands: Sequence[tuple[str, str]] = ()
    config: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class EvaluationOutputs:
    """What a command adds to the evaluation's folder."""

    source: Mapping[str, Any]                           # metrics.json's "source": model file, split, data
    page: Callable[[Mapping[str, Any]], ReportPage]     # the report's own part, from the metrics.json document
    gradcam: GradcamOptions
    training: Callable[[], TrainingRecord] | None = None  # metrics.json's "training" (core.final_train),
    #                                                           made just before the document, so its wall_s is all
    figures: Sequence[tuple[str, str]] = ()             # (caption, file) already in the folder, shown first
    coverage: float | None = None                       # the abstention rule's coverage (None: model.pt's)


@dataclass
class SamePass:
    """What a prediction's own forward pass also gives: the single view's penultimate features and logits
    (core/model/ood.py) and, for an ensemble file, its members' disagreement per view."""

    captured: Captured = field(default_factory=Captured)
    disagreement: dict[str, np.ndarray] = field(default_factory=dict)


def predict_set(loaded: LoadedModel, images: EvaluatedImages, pixels: np.ndarray, tta: bool,
                encoded: np.ndarray | None, seen: SamePass | None = None) -> EvaluatedSet:
    """The raw probabilities of a model for ``pixels`` = ``images.data.images[images.idx]``.

    ``tta``: predict the TTA view as well (after the single view); ``encoded``:
    ``loaded.encode_dataset(data, idx)``, the encoded clinical fields a fused model takes (else None); ``seen``: where
    what the same pass also gives goes.
    """
    data, idx = images.data, images.idx
    raw = {}
    for view in (SINGLE_MODE, TTA_MODE) if tta else (SINGLE_MODE,):
        single = seen is not None and view == SINGLE_MODE
        with capture(loaded.model, into=seen.captured) if single else nullcontext():
            if seen is not None and isinstance(loaded, EnsembleModel):   # its disagreement from the same pass
                found = loaded.predict_detail(pixels, tta=view == TTA_MODE, calibrated=False, clinical=encoded)
                raw[view], seen.disagreement[view] = found.probs, found.disagreement
            else:
                raw[view] = loaded.predict(pixels, tta=view == TTA_MODE, calibrated=False, clinical=encoded)
    metadata = None if data.metadata is None else data.metadata.iloc[idx].reset_index(drop=True)
    return EvaluatedSet(labels=np.asarray(images.labels, dtype=np.int64), groups=data.groups[idx],
                        image_ids=data.image_ids[idx], metadata=metadata, raw=raw)


def fit_on_validation(loaded: LoadedModel, data: Dataset, positive_class: str | None,
                      coverage: float = DEFAULT_COVERAGE) -> dict[str, Any]:
    """What a model file stores, fitted on the validation split in one pass (single view and TTA): temperatures and
    operating points (core/evaluation/sections.py), the out-of-distribution check and the abstention rule
    (core/model/checked_prediction.py; an ensemble's weighs its members' disagreement)."""
    val_idx = data.indices("val")
    seen = SamePass()
    val = predict_set(loaded, EvaluatedImages(data, val_idx, data.labels[val_idx], "validation split"),
                      np.asarray(data.images[val_idx]), True, loaded.encode_dataset(data, val_idx), seen)
    fitted = fit_on_val(val, data.class_names, positive_class)
    log.info("fitting the out-of-distribution check and the abstention rule (%.0f%% coverage) on the validation "
             "split", 100 * coverage)
    return {**fitted, **fit_checks(val.labels, dict(val.raw), fitted["calibration"]["temperature"], seen.captured,
                                   data.class_names, coverage, seen.disagreement or None)}


def score_images(loaded: LoadedModel, images: EvaluatedImages, stored: Mapping[str, Any],
                 options: SectionOptions) -> ScoredImages:
    """Predict, calibrate with model.pt's ``stored`` temperatures, the evaluation sections and the headline metrics."""
    pixels = np.asarray(images.data.images[images.idx])
    encoded = loaded.encode_dataset(images.data, images.idx)  # once: the prediction and Grad-CAM both take it
    seen = SamePass()
    with capture_boxes(loaded.model) as got:   # a box head's boxes, from the prediction's own pass
        predicted = predict_set(loaded, images, pixels, options.tta, encoded, seen)
    # the single view runs first: its boxes are the first len(idx) rows (the TTA passes' views follow)
    boxes = torch.cat(got)[:len(images.idx)].float().cpu().numpy() if got else None
    results = section_results(predicted, loaded.class_names, stored, options)
    scores = score_predictions(images.labels, results.probs, loaded.class_names)
    return ScoredImages(loaded=loaded, images=images, pixels=pixels, results=results, scores=scores,
                        clinical=encoded, boxes=boxes, captured=seen.captured,
                        stored=stored, disagreement=seen.disagreement)


def write_evaluation(out: Path, scored: ScoredImages, outputs: EvaluationOutputs) -> dict[str, Any]:
    """Figures, Grad-CAM, report.md and report.html, then metrics.json (last: the folder is complete once it is
    there); returns the metrics.json document."""
    from core.explain.gradcam import explain_evaluation

    out.mkdir(parents=True, exist_ok=True)
    (out / filenames.EVALUATION).unlink(missing_ok=True)  # an earlier evaluation's; this one's is written last
    figures = [*outputs.figures, *write_figures(out, scored)]
    if outputs.gradcam.per_class > 0:
        log.info("Grad-CAM galleries (%d examples per class)", outputs.gradcam.per_class)
    explained = explain_evaluation(scored.loaded.model, explainable(scored), out, scored.loaded.device,
                                   outputs.gradcam)
    localised = localise(out, scored, explained.masked_maps)
    if localised is not None:
        figures.append(("Boxes: the lesion masks' and the predicted ones", localisation.FIGURE))
    trust = trust_of(scored, outputs.coverage)
    figures += trust_figure(out, trust, scored.images.what)
    document = metrics_document(scored.scores, outputs.source,
                                training=outputs.training().to_dict() if outputs.training else None,
                                gradcam=explained.document, sections={**scored.results.sections, **trust})
    document["localisation"] = localised
    page = outputs.page(document)
    write_evaluation_report(out / filenames.REPORT, ReportInput(
        title=page.title, facts=page.facts, metrics=scored.scores.metrics, per_class=scored.scores.per_class,
        figures=figures, galleries=explained.galleries, config=page.config, notes=[*page.notes, *explained.notes],
        gradcam=explained.document, intervals=headline_intervals(document), interval_note=interval_note(document),
        tables=[*report_tables(document), *trust_tables(document),
                *filter(None, [localisation.localisation_table(localised)])],
        commands=page.commands))
    write_json(out / filenames.EVALUATION, document)
    return document


def write_figures(out: Path, scored: ScoredImages) -> list[tuple[str, str]]:
    """Confusion matrix, ROC curves and the reliability diagram into ``out``; returns their (caption, file)."""
    scores, what = scored.scores, scored.images.what
    confusion_matrix_figure(scores.confusion, scores.class_names, out / CONFUSION_FIGURE,
                            title=f"Confusion matrix, {what}")
    roc_figure(scores.labels, scores.probs, scores.class_names, out / ROC_FIGURE,
               title=f"ROC curves, {what} (one class vs the rest)")
    with warnings.catch_warnings():  # empty bins of the diagram
        warnings.simplefilter("ignore", RuntimeWarning)
        reliability_figure(scored.results.reliability, out / RELIABILITY_FIGURE,
                           title=f"Reliability diagram, {what}")
    return [("Confusion matrix", CONFUSION_FIGURE), ("ROC curves", ROC_FIGURE),
            ("Reliability diagram (before and after calibration)", RELIABILITY_FIGURE)]


def localise(out: Path, scored: ScoredImages, maps: np.ndarray | None) -> dict[str, Any] | None:
    """metrics.json's ``localisation`` (core/evaluation/localisation.py) on the evaluated images with a lesion mask, and
    ``boxes.png``; None where none has a mask. ``maps``: the Grad-CAM maps of those images (None: no Grad-CAM)."""
    data, idx = scored.images.data, scored.images.idx
    if data.masks is None or not np.asarray(data.has_mask)[idx].any():
        return None
    rows = np.flatnonzero(np.asarray(data.has_mask)[idx])
    masks = np.asarray(data.masks[idx[rows]])
    head = None if scored.boxes is None else scored.boxes[rows]
    # model.pt's "boxes": the Grad-CAM fraction and the centre prior (core/evaluation/localisation.py)
    section = localisation.localisation_section(masks, head, maps, scored.stored.get("boxes"))
    if section is None:
        return None
    shown = rows[np.linspace(0, len(rows) - 1, min(len(rows), localisation.FIGURE_IMAGES)).astype(int)]
    at = np.searchsorted(rows, shown)
    drawn = {} if head is None else {"head": head[at]}
    if maps is not None:
        fraction = section["boxes"]["gradcam"]["fraction"]
        drawn["gradcam"] = cam_boxes(maps[at], fraction)
    names, pred = scored.scores.class_names, scored.scores.probs.argmax(1)
    titles = [f"{data.image_ids[idx[i]]}\n{names[scored.scores.labels[i]]} -> {names[pred[i]]}" for i in shown]
    localisation.box_figure(scored.pixels[shown], np.asarray(data.masks[idx[shown]]), drawn, titles,
                            out / localisation.FIGURE)
    return section


# --- when not to trust the answer (core/evaluation/trust.py) ---------------------------------------------------

def trust_of(scored: ScoredImages, coverage: float | None) -> dict[str, Any]:
    """metrics.json's ``ood`` and ``abstention`` sections, with what model.pt stores."""
    tta = scored.results.sections["prediction"]["view"] == TTA_MODE
    images = Evaluated(pixels=scored.pixels, labels=scored.scores.labels, probs=scored.results.probs,
                       features=scored.captured.features, logits=scored.captured.logits, clinical=scored.clinical,
                       disagreement=scored.disagreement.get(TTA_MODE if tta else SINGLE_MODE))
    return trust_sections(scored.loaded, scored.stored, images, tta, coverage)


def trust_figure(out: Path, trust: Mapping[str, Any], what: str) -> list[tuple[str, str]]:
    risk_coverage_figure(trust["abstention"], out / RISK_COVERAGE_FIGURE, title=f"Risk-coverage, {what}")
    return [("Risk-coverage: the risk of the answered images against the share answered", RISK_COVERAGE_FIGURE)]


def explainable(scored: ScoredImages) -> Explainable:
    """The evaluated images with their labels and probabilities, and their lesion masks where the data has them:
    what Grad-CAM explains."""
    from core.explain.gradcam import Explainable

    data, idx, scores = scored.images.data, scored.images.idx, scored.scores
    masks = {} if data.masks is None else {"masks": np.asarray(data.masks[idx]), "has_mask": data.has_mask[idx]}
    return Explainable(scored.pixels, scores.labels, scores.probs, data.image_ids[idx], scores.class_names, **masks,
                       clinical=scored.clinical)  # None for an image-only model


def metrics_document(scores: PredictionScores, source: Mapping[str, Any], training: Mapping[str, Any] | None = None,
                     gradcam: Mapping[str, Any] | None = None,
                     sections: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metrics.json of an evaluation (one schema for core.evaluate and core.final_train).

    ``source``: what was evaluated (model file, split, data); ``training``: core.final_train's account of the
    training that made the model (absent for core.evaluate). Then the flat test_* metrics, per class figures,
    the confusion matrix, ``gradcam``: the heat maps' method and scores (core.explain.gradcam.explain_evaluation;
    null without Grad-CAM), then the ``sections`` (core/evaluation/sections.py: prediction, bootstrap, intervals,
    lesion_level, calibration, tta, operating_points, subgroups).
    """
    return {"format": EVALUATION_FORMAT, "version": 1, "status": "complete", "source": dict(source),
            **({"training": dict(training)} if training is not None else {}),
            **{k: finite_or_none(v) for k, v in scores.metrics.items()},
            "n_images": int(len(scores.labels)), "class_names": list(scores.class_names),
            "per_class": scores.per_class, "confusion_matrix": scores.confusion.tolist(),
            "gradcam": None if gradcam is None else dict(gradcam), **dict(sections or {})}


def data_source(data: Dataset) -> dict[str, Any]:
    """metrics.json's ``source.data``: the dataset an evaluation read (read back by evaluation_file.source_data_of)."""
    return SourceData(path=data.root, layout=data.layout, fingerprint=data.fingerprint,
                      class_names=tuple(data.class_names)).to_dict()
