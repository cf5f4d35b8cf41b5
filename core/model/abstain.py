"""When the model should not answer: too unsure (low calibrated confidence), or the image unlike the training images.

A library, not a command. The rule: answer only when the image's confidence clears a threshold chosen on
the validation split so that a share ``coverage`` of validation images (the user's, default 90%) is answered.
The confidence is the calibrated top probability; for an ensemble model it also takes the members'
disagreement: ``confidence = top probability - disagreement_weight * disagreement``, where ``disagreement`` is
what the ensemble's predict exposes per image (0 for a single model, whose stored weight is None). The
threshold is chosen on the same confidence, so that a disagreement term changes the rule and not its coverage.

core.final_train stores, per view (``single``, ``tta``), the quantiles of the validation images' confidence
(model.pt's ``abstention``), so any coverage can be asked for later (core.predict ``--coverage``, the
server's ``--coverage``) without the validation images. An image the out-of-distribution check
(core/model/ood.py) flags is abstained on too, with its own reason.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from core.errors import UserError

DEFAULT_COVERAGE = 0.9
QUANTILES = 201                   # stored quantiles of the validation confidence (every 0.5%)
LOW_CONFIDENCE, OUT_OF_DISTRIBUTION = "low_confidence", "out_of_distribution"   # the reasons
NO_RULE = "no abstention threshold in this model file (core.final_train chooses it on the validation split)"


def check_coverage(coverage: float, what: str = "--coverage") -> float:
    if not 0 < coverage <= 1:
        raise UserError(f"{what} {coverage}: the share of images answered must be in (0, 1]")
    return float(coverage)


def confidence(probs: np.ndarray, disagreement: np.ndarray | None = None, weight: float | None = None) -> np.ndarray:
    """Each image's confidence: its top probability, less ``weight`` x the members' ``disagreement`` (ensembles)."""
    top = np.asarray(probs, dtype=np.float64).max(1)
    if disagreement is None or not weight:
        return top
    return top - float(weight) * np.asarray(disagreement, dtype=np.float64)


def fit(val_probs: Mapping[str, np.ndarray], coverage: float = DEFAULT_COVERAGE,
        disagreement: Mapping[str, np.ndarray] | None = None, weight: float | None = None) -> dict[str, Any]:
    """model.pt's ``abstention``: per view, the validation confidence's quantiles and the threshold for
    ``coverage``; ``val_probs``: view -> calibrated probabilities [N, C] of the validation images."""
    check_coverage(coverage, "coverage")
    grid = np.linspace(0, 1, QUANTILES)
    views = {}
    for view, probs in val_probs.items():
        conf = confidence(probs, None if disagreement is None else disagreement.get(view), weight)
        views[view] = {"quantiles": [float(q) for q in np.quantile(conf, grid)],
                       "threshold": threshold_from(np.quantile(conf, grid), coverage)}
    return {"score": "top_probability" if not weight else "top_probability - weight x disagreement",
            "disagreement_weight": weight, "coverage": float(coverage), "chosen_on": "val",
            "n_images": int(len(next(iter(val_probs.values())))) if val_probs else 0, "views": views}


WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)   # the disagreement weights tried (mutual information is 0..log C nats)


def choose_weight(probs: np.ndarray, labels: np.ndarray, disagreement: np.ndarray) -> float:
    """The disagreement weight (of :data:`WEIGHTS`) whose confidence ranks the validation images best: the lowest
    area under the risk-coverage curve (AURC, the error of the answered images over every coverage)."""
    wrong = np.asarray(probs).argmax(1) != np.asarray(labels)
    return min(WEIGHTS, key=lambda w: aurc(confidence(probs, disagreement, w), wrong)) if len(wrong) else 0.0


def aurc(conf: np.ndarray, wrong: np.ndarray) -> float:
    """The area under the risk-coverage curve: the error rate of the surest k images (ties in the given order),
    averaged over every k."""
    order = np.argsort(-np.asarray(conf), kind="stable")
    return float(np.mean(np.cumsum(np.asarray(wrong, dtype=np.float64)[order]) / np.arange(1, len(order) + 1)))


def threshold_from(quantiles: Sequence[float] | np.ndarray, coverage: float) -> float:
    """The confidence that a share ``coverage`` of the images clears (the (1 - coverage) quantile)."""
    q = np.asarray(quantiles, dtype=np.float64)
    return float(np.interp(1 - coverage, np.linspace(0, 1, len(q)), q))


def threshold(stored: Mapping[str, Any] | None, view: str, coverage: float | None = None) -> float | None:
    """The stored rule's threshold for ``view`` at ``coverage`` (None: the stored coverage); None without a rule."""
    if not isinstance(stored, Mapping) or view not in (stored.get("views") or {}):
        return None
    chosen = stored["views"][view]
    return chosen["threshold"] if coverage is None else threshold_from(chosen["quantiles"], coverage)


def decide(stored: Mapping[str, Any] | None, probs: np.ndarray, view: str, ood: list[dict[str, Any]] | None = None,
           coverage: float | None = None, disagreement: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Each image's ``{"abstained", "reason", "detail", "confidence", "threshold", "coverage"}``.

    ``reason``: ``out_of_distribution`` (the check of core/model/ood.py flags the image: first, since its
    probabilities then mean nothing), ``low_confidence``, or None when the model answers.
    """
    limit = threshold(stored, view, coverage)
    weight = stored.get("disagreement_weight") if isinstance(stored, Mapping) else None
    conf = confidence(probs, disagreement, weight)
    wanted = coverage if coverage is not None else (stored or {}).get("coverage") if limit is not None else None
    answers = []
    for i, value in enumerate(conf):
        flagged = ood is not None and ood[i].get("in_distribution") is False
        unsure = limit is not None and value < limit
        reason = OUT_OF_DISTRIBUTION if flagged else LOW_CONFIDENCE if unsure else None
        detail = ("the image does not look like the training images: its out-of-distribution score "
                  f"{ood[i]['score']:.1f} is above {ood[i]['threshold']:.1f}, which 95% of validation images stay under"
                  if flagged else
                  f"too unsure: confidence {value:.3f} below {limit:.3f}, the threshold that answers "
                  f"{100 * wanted:.0f}% of validation images" if unsure else
                  NO_RULE if limit is None else None)
        answers.append({"abstained": reason is not None, "reason": reason, "detail": detail,
                        "confidence": float(value), "threshold": limit,
                        "coverage": None if wanted is None else float(wanted)})
    return answers
