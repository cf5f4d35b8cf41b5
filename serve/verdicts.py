"""The positive class's probability (melanoma) against the operating points stored in model.pt, in words.

core.final_train chooses thresholds on the validation split (core/evaluation/operating_points.py) and stores them
under ``operating_points.modes["<single|tta>/<calibrated|raw>"]``. An image is called positive when its
probability is >= the threshold (the convention of core/evaluation/operating_points.py). "specificity_at_sensitivity"
with target 0.90 is the threshold chosen for sensitivity 0.90.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np

WANTED = {"specificity_at_sensitivity": "sensitivity", "sensitivity_at_specificity": "specificity"}


def operating_verdicts(stored: Mapping[str, Any] | None, class_names: tuple[str, ...],
                       probs: np.ndarray | Sequence[float], tta: bool) -> dict[str, Any]:
    """{"positive_class", "probability", "mode", "points": [{..., "above", "text"}]} or {"skipped": why}."""
    if not stored:
        return {"skipped": "the model file holds no operating points"}
    if stored.get("skipped"):
        return {"skipped": str(stored["skipped"])}
    name = stored.get("positive_class")
    mode = f"{'tta' if tta else 'single'}/calibrated"
    chosen = (stored.get("modes") or {}).get(mode)
    if name not in class_names or chosen is None:
        return {"skipped": f"the model file holds no operating points for {name} ({mode} probabilities)"}
    p = float(probs[class_names.index(name)])
    points = []
    for row in chosen.get("points") or []:
        wanted = WANTED.get(row["kind"], row["kind"])
        above = p >= float(row["threshold"])
        points.append({**row, "above": above,
                       "text": f"{'above' if above else 'below'} the threshold chosen for {wanted} "
                               f"{row['target']:.2f} ({row['threshold']:.3f})"})
    return {"positive_class": name, "probability": p, "mode": mode, "chosen_on": stored.get("chosen_on"),
            "points": points}
