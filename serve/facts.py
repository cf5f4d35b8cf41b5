"""What the page and /v2/models/<name> say about the model: from model.pt's metadata and metrics.json beside it.

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
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from core import filenames
from core.config import DEFAULT_ARCH

log = logging.getLogger(__name__)


def model_facts(path: str | Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-ready summary of the model: file, arch, classes, training, calibration and test figures."""
    path = Path(path)
    config = meta.get("config") or {}
    calibration = meta.get("calibration") or {}
    facts: dict[str, Any] = {
        "file": path.name,
        "written": dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "arch": meta.get("arch") or DEFAULT_ARCH,
        "classes": list(meta.get("class_names") or []),
        "image_size": int(meta.get("image_size") or config.get("image_size") or 0),
        "epoch": meta.get("epoch"),
        "epochs": config.get("epochs"),
        "pretrained": _initial_weights(config.get("pretrained")),
        "calibration": ({"temperature": calibration.get("temperature"), "fitted_on": calibration.get("fitted_on")}
                        if calibration.get("temperature") else
                        {"skipped": calibration.get("skipped") or "the model file holds no temperature"}),
        "metadata_fields": meta.get("metadata") is not None,
        # an ensemble.pt's evaluation is in ensemble/ beside it (core/final_ensemble.py)
        "test": _test_figures(path.parent / (filenames.ENSEMBLE_DIR if meta.get("members") else "") / filenames.EVALUATION),
    }
    if meta.get("members"):  # an ensemble file (core/model/ensemble.py): its members and their weights
        facts["ensemble"] = [{"name": m.get("name"), "weight": m.get("weight")} for m in meta["members"]]
    return facts


def _test_figures(path: Path) -> dict[str, Any] | None:
    """Test figures from metrics.json; None (with the reason logged) where it is absent or unreadable."""
    if not path.is_file():
        log.info("no %s beside the model: the page shows no test figures", path.name)
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: not readable JSON (%s): the page shows no test figures", path, exc)
        return None
    if not isinstance(document, dict):
        return None
    source, training = document.get("source") or {}, document.get("training") or {}
    data = source.get("data") or {}
    return {"balanced_accuracy": document.get("test_balanced_accuracy"),
            "balanced_accuracy_ci": (document.get("intervals") or {}).get("test_balanced_accuracy"),
            "accuracy": document.get("test_accuracy"), "auc": document.get("test_auc"),
            "n_images": document.get("n_images"), "split": source.get("split"),
            "data": {"name": _name(data.get("path")), "layout": data.get("layout"),
                     "classes": len(data.get("class_names") or []) or None},
            "split_sizes": training.get("split_sizes"), "epochs_run": training.get("epochs_run")}


def _name(path: object) -> str | None:
    """The last part of a recorded path (a data set's folder name): what a visitor needs, not where it lies."""
    return Path(str(path)).name or None if path else None


def _initial_weights(pretrained: object) -> object:
    """config.pretrained as shown: 'imagenet' and 'none' as they are, a state_dict file by its name only."""
    if pretrained in (None, "imagenet", "none"):
        return pretrained
    return f"the weights file {_name(pretrained)}"
