"""What the page and /v2/models/<name> say about the model: from model.pt's header and metrics.json beside it.

model.pt (core.final_train) holds the classes, image size, config, chosen epoch, calibration and operating
points; metrics.json (its test evaluation, when it is beside the model) says on what data it was trained
and tested, and the test balanced accuracy with its bootstrap interval. The file's time stands for when
it was trained: model.pt records no date of its own.

Every answer of the server is seen by whoever reaches it (a public page): the facts name files by their
name only, never by the server's paths (the data folder, a weights file, the model file), which the model
file and metrics.json keep for the one who trained it.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any, Mapping

from core import filenames
from core.model.model_header import header_of
from core.evaluation.evaluation_file import path_name, read_evaluation_figures

log = logging.getLogger(__name__)


def model_facts(path: str | Path, stored: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-ready summary of the model: file, arch, classes, training, calibration and test figures."""
    path, header = Path(path), header_of(stored)
    facts: dict[str, Any] = {
        "file": path.name,
        "written": dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "arch": header.arch,
        "classes": list(header.class_names),
        "image_size": header.image_size,
        "epoch": header.epoch,
        "epochs": header.epochs,
        "pretrained": _initial_weights(header.pretrained),
        "calibration": ({"temperature": dict(header.temperature), "fitted_on": header.fitted_on}
                        if header.temperature else
                        {"skipped": header.not_calibrated or "the model file holds no temperature"}),
        "metadata_fields": header.has_clinical_fields,
        # an ensemble.pt's evaluation is in ensemble/ beside it (core/final_ensemble.py)
        "test": _test_figures(path.parent / (filenames.ENSEMBLE_DIR if header.is_ensemble else "") / filenames.EVALUATION),
    }
    if header.is_ensemble:  # an ensemble file (core/model/ensemble.py): its members and their weights
        facts["ensemble"] = [{"name": m.name, "weight": m.weight} for m in header.members]
    return facts


def _test_figures(path: Path) -> dict[str, Any] | None:
    """Test figures from metrics.json (core/evaluation/evaluation_file.py); None where it is absent or unreadable
    (the page then shows none)."""
    figures = read_evaluation_figures(path)
    return None if figures is None else figures.to_dict()


def _initial_weights(pretrained: str | None) -> str | None:
    """config.pretrained as shown: 'imagenet' and 'none' as they are, a state_dict file by its name only."""
    if pretrained in (None, "imagenet", "none"):
        return pretrained
    return f"the weights file {path_name(pretrained)}"
