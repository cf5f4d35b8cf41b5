"""core.final_train's second model: the ensemble the sweep chose on validation (ensemble.json beside best.json,
core/ensemble_file.py), built from its members' own checkpoints (``trials/<id>/best.pt``: trained on the same
train split; nothing is trained again), calibrated and given operating points on the averaged validation
probabilities, and evaluated once on the test split beside the single model.

A library, called by core/final_train.py when the sweep wrote an ensemble.json with two or more members. Writes
``final/ensemble.pt`` (core/model/ensemble.py; core.evaluate, core.predict and serve take it as a model file),
``final/ensemble/`` (the ensemble's evaluation: metrics.json, report.md, figures, as for any model) and
``final/ensemble_comparison.json`` (single and ensemble side by side, core/evaluation/ensemble_compare.py), whose table
the final report.md shows. A member whose file is missing or damaged is a one-line error naming it: an ensemble
other than the one chosen on validation is never built silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from core import filenames
from core.io.atomic import save_torch, write_json
from core.best_file import SPLITS_ADVICE, BestFile
from core.evaluation.sections import SectionOptions
from core.config import TrainConfig
from core.data.dataset import Dataset, load_for_config
from core.evaluation.ensemble_compare import compare, comparison_table
from core.ensemble_file import EnsembleChoice, read_ensemble_choice
from core.model.ensemble import EnsembleModel, ensemble_document, ensemble_from_payload
from core.evaluation.pipeline import (EvaluatedImages, EvaluationOutputs, ReportPage, ScoredImages, data_source,
                                      fit_on_validation, score_images, write_evaluation)
from core.io.state_files import reading
from core.model.abstain import DEFAULT_COVERAGE

if TYPE_CHECKING:  # core.explain.gradcam imports Captum: only when Grad-CAM runs
    from core.explain.gradcam import GradcamOptions

log = logging.getLogger(__name__)

COMPARISON_FILE = "ensemble_comparison.json"
# A member's checkpoint that cannot be read: what to do.
MEMBER_ADVICE = ("the sweep's trial folder must hold it (with --storage: core.download ... --include-models); "
                 "or choose without the ensemble: delete ensemble.json beside best.json")


@dataclass(frozen=True)
class FinalEnsemble:
    choice: EnsembleChoice
    model: EnsembleModel
    document: dict[str, Any]         # ensemble.pt's contents, fitted on val
    scored: ScoredImages
    comparison: dict[str, Any]

    def notes(self) -> list[str]:
        """The final report's lines on the ensemble: the comparison table and where its files are."""
        members = ", ".join(f"{m.trial_id} (weight {m.weight:.2f})" for m in self.choice.members)
        return [f"**Ensemble** of {len(self.choice.members)} sweep runs chosen greedily on validation "
                f"({self.choice.metric_name} {self.choice.best_single_value:.4f} for the best run alone, "
                f"{self.choice.ensemble_value:.4f} for the ensemble): {members}. Test split, the same images, "
                f"95% intervals over lesions; `{filenames.ENSEMBLE_MODEL}`, evaluated in "
                f"`{filenames.ENSEMBLE_DIR}/report.md`:\n\n" + "\n".join(comparison_table(self.comparison))]


def prepare_ensemble(best: BestFile, cfg: TrainConfig, data: Dataset, single: ScoredImages,
                     options: SectionOptions, progress: bool = True,
                     coverage: float = DEFAULT_COVERAGE) -> FinalEnsemble | None:
    """Build, calibrate and score the sweep's ensemble; None when the sweep chose none (or the best run alone)."""
    path = best.folder / filenames.ENSEMBLE_CHOICE
    if not path.is_file():
        return None
    choice = read_ensemble_choice(path)
    if not choice.is_ensemble:
        log.info("%s: no run improved on the best run alone on validation; no ensemble", path)
        return None
    members = [(m.trial_id, m.checkpoint, m.weight) for m in choice.members]
    log.info("building the ensemble of %d sweep runs (%s)", len(members), path)
    model, document, scored = calibrated_ensemble(members, {"ensemble": _record(choice)}, path, best, cfg, data,
                                                  EnsembleFit(options, coverage, progress))
    data = scored.images.data
    test_idx = data.indices("test")
    if not np.array_equal(data.image_ids[test_idx], single.images.data.image_ids[single.images.idx]):
        raise AssertionError("the ensemble's test images differ from the single model's")
    comparison = compare(single.scores.labels, data.groups[test_idx], single.results.probs, scored.results.probs,
                         resamples=options.resamples, seed=options.seed)
    return FinalEnsemble(choice, model, document, scored, comparison)


@dataclass(frozen=True)
class EnsembleFit:
    """How an ensemble is fitted and scored: the evaluation's options, the abstention rule's coverage, and whether
    reading the data shows progress."""

    options: SectionOptions
    coverage: float = DEFAULT_COVERAGE
    progress: bool = False


def calibrated_ensemble(members: list[tuple[str, Any, float]], extra: Mapping[str, Any], path: Path, best: BestFile,
                        cfg: TrainConfig, data: Dataset, fit: EnsembleFit,
                        ) -> tuple[EnsembleModel, dict[str, Any], ScoredImages]:
    """An ensemble of the model files ``members`` ((name, file, weight)), its temperature and operating points
    fitted on the averaged validation probabilities, scored once on the test split; ``path``: the file that
    named the members (in errors). Returns the model, the ensemble file's contents and the test scores."""
    with reading(path, MEMBER_ADVICE):
        document = ensemble_document(members, extra, advice=MEMBER_ADVICE)
    model = ensemble_from_payload(document, path, cfg.device)
    size = int(document["image_size"])
    if size != cfg.image_size:  # the members' largest size; the single model's data is at its own
        with reading(best.splits_file, SPLITS_ADVICE):
            data = load_for_config(best.data_path, replace(cfg, image_size=size), splits_file=best.splits_file,
                                   progress=fit.progress)
    # temperatures, operating points, the out-of-distribution check (on the first member's features) and the
    # abstention rule, whose confidence also weighs the members' disagreement: one pass over the val split
    fitted = fit_on_validation(model, data, fit.options.positive_class, fit.coverage)
    document.update(fitted)
    model = replace(model, header={**model.header, **fitted})
    test_idx = data.indices("test")
    scored = score_images(model, EvaluatedImages(data, test_idx, data.labels[test_idx], "test split"), fitted,
                          fit.options)
    return model, document, scored


def write_ensemble(out: Path, ensemble: FinalEnsemble, gradcam: GradcamOptions,
                   page: Callable[[Mapping[str, Any]], ReportPage]) -> dict[str, Any]:
    """ensemble.pt, the comparison, then the ensemble's evaluation folder; returns its metrics.json document."""
    save_torch({**ensemble.document, "metrics": ensemble.scored.scores.metrics}, out / filenames.ENSEMBLE_MODEL)
    write_json(out / COMPARISON_FILE, ensemble.comparison)
    source = {"model": str((out / filenames.ENSEMBLE_MODEL).resolve()), "split": "test",
              "data": data_source(ensemble.scored.images.data), "ensemble": _record(ensemble.choice)}
    return write_evaluation(out / filenames.ENSEMBLE_DIR, ensemble.scored,
                            EvaluationOutputs(source=source, gradcam=gradcam, page=page))


def ensemble_page(best: BestFile, ensemble: FinalEnsemble, out: Path) -> Callable[[Mapping[str, Any]], ReportPage]:
    """The ensemble report's own part."""
    choice, model = ensemble.choice, out / filenames.ENSEMBLE_MODEL

    def page(document: Mapping[str, Any]) -> ReportPage:
        facts = [("source", f"`{choice.path.resolve()}`: {len(choice.members)} runs of sweep {best.folder.name}, "
                            f"chosen greedily on validation ({choice.metric_name} {choice.ensemble_value:.4f}; best "
                            f"run alone {choice.best_single_value:.4f})"),
                 ("members", ", ".join(f"`{m.trial_id}` x{m.count} ({m.role})" for m in choice.members)),
                 ("model file", f"`{model}` (core.evaluate, core.predict and serve take it as a model file)")]
        return ReportPage(title=f"Ensemble of sweep {best.folder.name}", facts=facts,
                          notes=["\n".join(["Single model against ensemble on the same test images:", "",
                                            *comparison_table(ensemble.comparison)])],
                          commands=[("Predict images with the ensemble",
                                     f"python -m core.predict {model} IMAGE... --json")])
    return page


def _record(choice: EnsembleChoice) -> dict[str, Any]:
    return {"chosen_in": str(choice.path.resolve()), "metric": choice.metric_name,
            "best_single": {"trial_id": choice.best_single_id, "value": choice.best_single_value},
            "value": choice.ensemble_value,
            "members": [{"trial_id": m.trial_id, "role": m.role, "count": m.count, "weight": m.weight}
                        for m in choice.members]}
