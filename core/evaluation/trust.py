"""The evaluation's "when not to trust the answer" sections: out-of-distribution detection and abstention.

A library, not a command: core/evaluation/pipeline.py runs :func:`trust_sections` for core.final_train and
core.evaluate, and their metrics.json carries ``ood`` and ``abstention``; :func:`trust_tables` and
:func:`risk_coverage_figure` put them in the report.

- ``ood``: for each score of core/model/ood.py (Mahalanobis, max-softmax, energy), the AUROC and the false-positive
  rate at 95% of the evaluated (in-distribution) images passing (FPR@95: the share of out-of-distribution images
  that pass the threshold 95% of in-distribution ones stay under), against the far-out sets of
  core/evaluation/ood_sets.py
  (natural photos, synthetic images, both together) and, apart, the shifted lesions (the evaluated images
  blurred, JPEG quality 10, colour-cast, rotated), with the balanced accuracy on them; and the share of each
  set the stored (validation) threshold flags.
- ``abstention``: the risk-coverage curve of the headline probabilities (confidence: the top probability;
  answered first the surest), the balanced accuracy at 100 / 90 / 80% coverage, AURC (the mean error rate over
  every coverage; Geifman et al. 2019, Traub et al. 2024) and the stored rule at the asked coverage.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from core.model import abstain, ood
from core.evaluation.report import Table
from core.model.inference import SINGLE_MODE, TTA_MODE, LoadedModel
from core.evaluation.ood_sets import SHIFTS, natural_photos, shifted, synthetic

RISK_COVERAGE_FIGURE = "risk_coverage.png"
COVERAGES = (1.0, 0.9, 0.8)
MAX_SHIFTED = 1000                # shifted copies of at most this many evaluated images (each shift)
SCORE_NAMES = {"mahalanobis": "Mahalanobis", "max_softmax": "max-softmax", "energy": "energy"}
SET_NAMES = {"natural_photos": "natural photos", "synthetic": "synthetic (noise, flat, gradient)",
             "far_out": "far-out, all", "blur": "shifted: blurred", "jpeg_q10": "shifted: JPEG quality 10",
             "colour_cast": "shifted: colour cast", "rotated": "shifted: rotated 30°"}


@dataclass(frozen=True)
class Evaluated:
    """The evaluated images as predicted: pixels, labels, headline probabilities, captured features and logits."""

    pixels: np.ndarray            # uint8 [N, 3, S, S]
    labels: np.ndarray            # int [N]
    probs: np.ndarray             # the headline probabilities [N, C]
    features: np.ndarray          # the single view's penultimate features [N, D] (core/model/ood.py capture)
    logits: np.ndarray            # its raw logits [N, C]
    clinical: np.ndarray | None = None    # their encoded clinical fields (a model with clinical fields)
    disagreement: np.ndarray | None = None  # an ensemble's members' disagreement [N] (core/model/abstain.py)


def trust_sections(loaded: LoadedModel, stored: Mapping[str, Any], images: Evaluated, tta: bool,
                   coverage: float | None = None) -> dict[str, Any]:
    """metrics.json's ``ood`` and ``abstention`` sections; ``stored``: model.pt's fitted statistics."""
    return {"ood": ood_results(loaded, stored.get("ood"), images),
            "abstention": abstention_results(images, stored.get("abstention"), tta, coverage)}


def ood_results(loaded: LoadedModel, stored: Mapping[str, Any] | None, images: Evaluated) -> dict[str, Any]:
    if not ood.is_fitted(stored):
        return {"skipped": f"{ood.NO_CHECK} ({ood.FIT_ADVICE})"}
    inside = ood.all_scores(stored, images.features, images.logits)
    size = loaded.image_size
    photos, _ = natural_photos(size)
    made, _ = synthetic(size)
    far = {"natural_photos": predicted_scores(loaded, stored, photos, None)[1],
           "synthetic": predicted_scores(loaded, stored, made, None)[1]}
    far["far_out"] = {name: np.concatenate([far["natural_photos"][name], far["synthetic"][name]])
                      for name in ood.SCORES}
    section: dict[str, Any] = {
        "method": stored.get("method"), "fitted_on": stored.get("fitted_on"), "n_fit_images": stored.get("n_images"),
        "pass_rate": stored.get("pass_rate"), "thresholds": dict(stored["thresholds"]),
        "evaluated_pass_rate": {name: float(np.mean(inside[name] <= stored["thresholds"][name]))
                                for name in ood.SCORES},
        "far_out": {key: compare(inside, values, stored) for key, values in far.items()}}
    keep = slice(0, min(len(images.pixels), MAX_SHIFTED))
    section["shifted_lesions"] = {}
    for shift in SHIFTS:
        clinical = None if images.clinical is None else images.clinical[keep]
        probs, scores = predicted_scores(loaded, stored, shifted(images.pixels[keep], shift), clinical)
        section["shifted_lesions"][shift] = {
            **compare({k: v[keep] for k, v in inside.items()}, scores, stored),
            "balanced_accuracy": _balanced_accuracy(images.labels[keep], probs),
            "balanced_accuracy_unshifted": _balanced_accuracy(images.labels[keep], images.probs[keep])}
    section["best_score"] = {group: _best(rows) for group, rows in
                             (("far_out", section["far_out"]["far_out"]["scores"]),
                              ("shifted_lesions", _mean_scores(section["shifted_lesions"])))}
    return section


def predicted_scores(loaded: LoadedModel, stored: Mapping[str, Any], pixels: np.ndarray,
            clinical: np.ndarray | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with ood.capture(loaded.model) as seen:
        probs = loaded.predict(pixels, clinical=clinical)
    return probs, ood.all_scores(stored, seen.features, seen.logits)


def compare(inside: Mapping[str, np.ndarray], outside: Mapping[str, np.ndarray],
             stored: Mapping[str, Any]) -> dict[str, Any]:
    """AUROC and FPR@95 of each score, in-distribution (negatives) against out (positives)."""
    rows = {}
    for name in ood.SCORES:
        a, b = inside[name], outside[name]
        rows[name] = {"auroc": float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b])),
                      "fpr_at_95": float(np.mean(b <= np.quantile(a, 0.95))),
                      "flagged_by_stored": float(np.mean(b > stored["thresholds"][name]))}
    return {"n": int(len(next(iter(outside.values())))), "n_in_distribution": int(len(inside[ood.DECIDING])),
            "scores": rows}


def _mean_scores(shifts: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {name: {"fpr_at_95": float(np.mean([s["scores"][name]["fpr_at_95"] for s in shifts.values()]))}
            for name in ood.SCORES}


def _best(rows: Mapping[str, Mapping[str, float]]) -> str:
    return min(rows, key=lambda name: rows[name]["fpr_at_95"])


def _balanced_accuracy(labels: np.ndarray, probs: np.ndarray) -> float | None:
    if len(labels) == 0:
        return None
    with warnings.catch_warnings():  # a class predicted but absent from the kept labels
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(labels, probs.argmax(1)))


def risk_coverage(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """The risk-coverage curve (the surest answered first), AURC and the balanced accuracy at COVERAGES."""
    labels = np.asarray(labels)
    order = np.argsort(-np.asarray(probs).max(1), kind="stable")
    n = len(labels)
    grid = np.round(np.arange(0.1, 1.0001, 0.02), 4)
    kept = [order[:max(1, math.ceil(c * n))] for c in grid]
    return {"aurc": abstain.aurc(np.asarray(probs).max(1), np.asarray(probs).argmax(1) != labels), "n_images": int(n),
            "at": {f"{c:.2f}": {"balanced_accuracy": _balanced_accuracy(labels[k], probs[k]),
                                "accuracy": float(np.mean(probs[k].argmax(1) == labels[k])), "n": int(len(k))}
                   for c in COVERAGES for k in [order[:max(1, math.ceil(c * n))]]},
            "curve": {"coverage": grid.tolist(),
                      "error": [float(1 - np.mean(probs[k].argmax(1) == labels[k])) for k in kept],
                      "balanced_accuracy": [_balanced_accuracy(labels[k], probs[k]) for k in kept]}}


def abstention_results(images: Evaluated, stored: Mapping[str, Any] | None, tta: bool,
                       coverage: float | None) -> dict[str, Any]:
    section = risk_coverage(images.labels, images.probs)
    view = TTA_MODE if tta else SINGLE_MODE
    limit = abstain.threshold(stored, view, coverage)
    if limit is None:
        section["rule"] = {"skipped": abstain.NO_RULE}
        return section
    conf = abstain.confidence(images.probs, images.disagreement, stored.get("disagreement_weight"))
    answered = conf >= limit
    target = coverage if coverage is not None else stored.get("coverage")
    section["rule"] = {"view": view, "coverage_asked": target, "threshold": limit, "chosen_on": stored.get("chosen_on"),
                       "coverage": float(answered.mean()),
                       "balanced_accuracy_answered": _balanced_accuracy(images.labels[answered], images.probs[answered]),
                       "balanced_accuracy_all": _balanced_accuracy(images.labels, images.probs)}
    return section


def risk_coverage_figure(section: Mapping[str, Any], path: str | os.PathLike, title: str) -> None:
    """Error rate and balanced accuracy of the answered images against the share answered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.io.atomic import save_figure

    curve = section["curve"]
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ax.plot(curve["coverage"], curve["error"], label=f"error rate (AURC {section['aurc']:.3f})")
    ax.plot(curve["coverage"], [np.nan if v is None else 1 - v for v in curve["balanced_accuracy"]],
            label="1 - balanced accuracy")
    rule = section.get("rule") or {}
    if "coverage" in rule:
        ax.axvline(rule["coverage"], color="grey", linestyle="--",
                   label=f"stored rule (asked {100 * rule['coverage_asked']:.0f}% on val)")
    ax.set_xlabel("coverage (share of images answered, the surest first)")
    ax.set_ylabel("risk on the answered images")
    ax.set_xlim(0, 1)
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def trust_tables(document: Mapping[str, Any]) -> list[Table]:
    """The report's tables of the ``ood`` and ``abstention`` sections."""
    tables = []
    section = document.get("ood") or {}
    if section.get("skipped"):
        tables.append(Table("Images unlike the training data", ["check"], [[section["skipped"]]]))
    elif section:
        rows = [[SET_NAMES[key], str(group["n"]),
                 *(f"{group['scores'][s]['auroc']:.3f} / {100 * group['scores'][s]['fpr_at_95']:.1f}%"
                   for s in ood.SCORES)]
                for key, group in [*section["far_out"].items(), *section["shifted_lesions"].items()]]
        passing = ", ".join(f"{SCORE_NAMES[s]} {100 * v:.1f}%" for s, v in section["evaluated_pass_rate"].items())
        tables.append(Table(
            "Images unlike the training data", ["set", "images", *(f"{SCORE_NAMES[s]}: AUROC / FPR@95"
                                                                   for s in ood.SCORES)], rows,
            intro=(f"Each score against the evaluated images: AUROC, and FPR@95 (the share of the set that passes "
                   f"the threshold 95% of the evaluated images stay under; lower is better). The served check is "
                   f"{SCORE_NAMES[section['method']]}, its threshold fitted on the {section['fitted_on']} split."),
            notes=[f"Evaluated images passing the stored thresholds: {passing} (fitted for 95%).",
                   f"Best score by FPR@95: far-out {SCORE_NAMES[section['best_score']['far_out']]}, shifted lesions "
                   f"{SCORE_NAMES[section['best_score']['shifted_lesions']]}.",
                   "Balanced accuracy on the shifted lesions: " + ", ".join(
                       f"{SET_NAMES[k].removeprefix('shifted: ')} {_fmt(v['balanced_accuracy'])} (unshifted "
                       f"{_fmt(v['balanced_accuracy_unshifted'])})" for k, v in section["shifted_lesions"].items())]))
    rc = document.get("abstention")
    if rc:
        rows = [[f"{100 * float(c):.0f}%", str(v["n"]), _fmt(v["balanced_accuracy"]), _fmt(v["accuracy"])]
                for c, v in rc["at"].items()]
        rule = rc.get("rule") or {}
        notes = [f"AURC (mean error rate over every coverage): {rc['aurc']:.4f}."]
        notes.append(rule["skipped"] if "skipped" in rule else
                     f"Stored rule (confidence >= {rule['threshold']:.3f}, chosen on {rule['chosen_on']} to answer "
                     f"{100 * rule['coverage_asked']:.0f}%): answers {100 * rule['coverage']:.1f}% here, balanced "
                     f"accuracy {_fmt(rule['balanced_accuracy_answered'])} against {_fmt(rule['balanced_accuracy_all'])}"
                     f" on all.")
        tables.append(Table("Abstention: answering only the surest", ["coverage", "images", "balanced accuracy",
                                                                        "accuracy"], rows,
                            intro="The surest images (highest top probability) answered first.", notes=notes))
    return tables


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
