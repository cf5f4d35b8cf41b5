"""A prediction with its checks: the probabilities, whether the image looks like the training images, whether to
answer. What core.predict and the server (serve/) use; core/model/ood.py and core/model/abstain.py hold the rules.

One forward pass: the out-of-distribution score's features are captured from the pass that gives the
probabilities (core/model/ood.py ``capture``). Its cost per request is the hook's copy of the features and a
Mahalanobis distance to each class mean ([N, D] x [D, D] per class): bench/README.md has the measured figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.model import abstain, ood
from core.model.calibration import apply_temperature
from core.model.ensemble import EnsembleModel, describe_disagreement
from core.model.inference import SINGLE_MODE, TTA_MODE, LoadedModel
from core.model.tta import N_VIEWS


def predict_checked(loaded: LoadedModel | EnsembleModel, images_uint8: np.ndarray, *, tta: bool = False,
                    calibrated: bool = True, clinical: np.ndarray | None = None,
                    coverage: float | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Probabilities [N, C] (as ``loaded.predict``) and per image ``{"ood": ..., "abstain": ...}``; an ensemble
    file's also ``"disagreement"`` (its members', from the same pass, with its reading in words), which its
    abstention rule weighs (core/model/abstain.py).

    ``coverage``: the share of validation images the abstention rule answers (None: the stored one, 90% by
    default).
    """
    disagreement = None
    with ood.capture(loaded.model, views=N_VIEWS if tta else 1) as seen:
        if isinstance(loaded, EnsembleModel):
            found = loaded.predict_detail(images_uint8, tta=tta, calibrated=calibrated, clinical=clinical)
            probs, disagreement = found.probs, found.disagreement
        else:
            probs = loaded.predict(images_uint8, tta=tta, calibrated=calibrated, clinical=clinical)
    checked = checks(loaded.header, probs, seen.features, seen.logits, tta, coverage, disagreement)
    for row, value in zip(checked, [] if disagreement is None else disagreement):
        row["disagreement"] = {"mutual_information": float(value), "words": describe_disagreement(float(value))}
    return probs, checked


def checks(header: dict[str, Any], probs: np.ndarray, features: np.ndarray, logits: np.ndarray, tta: bool,
           coverage: float | None = None, disagreement: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The checks of images already predicted: ``header`` the model file's, ``features``/``logits`` captured."""
    found = ood.check(header.get("ood"), features, logits)
    decided = abstain.decide(header.get("abstention"), probs, TTA_MODE if tta else SINGLE_MODE, found, coverage,
                             disagreement)
    return [{"ood": o, "abstain": a} for o, a in zip(found, decided)]


def fit_checks(labels: np.ndarray, raw: dict[str, np.ndarray], temperatures: dict[str, float | None],
               seen: ood.Captured, class_names: list[str] | tuple[str, ...],
               coverage: float = abstain.DEFAULT_COVERAGE,
               disagreement: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """model.pt's ``ood`` and ``abstention``, fitted on the validation images: their ``labels``, raw probabilities
    per view, the fitted ``temperatures``, and the single view's features and logits ``seen`` (core/model/ood.py);
    ``disagreement``: an ensemble's members' disagreement per view, whose weight in the confidence is chosen on
    the same images (core/model/abstain.py ``choose_weight``)."""
    calibrated = {view: probs if not temperatures.get(view) else apply_temperature(probs, temperatures[view])
                  for view, probs in raw.items()}
    weight = None if not disagreement else abstain.choose_weight(calibrated[SINGLE_MODE], labels,
                                                                 disagreement[SINGLE_MODE])
    return {"ood": ood.fit(seen.features, seen.logits, labels, class_names),
            "abstention": abstain.fit(calibrated, coverage, disagreement, weight)}
