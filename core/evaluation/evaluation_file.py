"""metrics.json read back: the one typed reader of an evaluation's headline figures and where they came from.

A library, not a command. core/evaluation/pipeline.py writes the file (format ``lesion-sweep/evaluation``);
whoever shows a model's test figures later (the server's page and ``/info``, serve/facts.py) reads them here
instead of by string keys of its own::

    figures = read_evaluation_figures(Path("results/<sweep>/final/metrics.json"))   # None: absent or unreadable
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataFacts:
    """The evaluated data set as a visitor may see it: its folder's name (never its path), layout, class count."""

    name: str | None
    layout: str | None
    classes: int | None


@dataclass(frozen=True)
class EvaluationFigures:
    """The headline of one metrics.json."""

    balanced_accuracy: float | None
    balanced_accuracy_ci: Mapping[str, Any] | None   # the bootstrap interval over lesions (its ``intervals`` entry)
    accuracy: float | None
    auc: float | None
    n_images: int | None
    split: str | None                                # the split evaluated ("test")
    data: DataFacts
    split_sizes: Mapping[str, int] | None            # core.final_train's train/val/test image counts
    epochs_run: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def figures_of(document: Mapping[str, Any]) -> EvaluationFigures:
    """The headline of a metrics.json document (absent entries: None)."""
    source, training = document.get("source") or {}, document.get("training") or {}
    data = source.get("data") or {}
    return EvaluationFigures(
        balanced_accuracy=document.get("test_balanced_accuracy"),
        balanced_accuracy_ci=(document.get("intervals") or {}).get("test_balanced_accuracy"),
        accuracy=document.get("test_accuracy"), auc=document.get("test_auc"), n_images=document.get("n_images"),
        split=source.get("split"),
        data=DataFacts(name=path_name(data.get("path")), layout=data.get("layout"),
                       classes=len(data.get("class_names") or []) or None),
        split_sizes=training.get("split_sizes"), epochs_run=training.get("epochs_run"))


def read_evaluation_figures(path: Path) -> EvaluationFigures | None:
    """The headline of the metrics.json at ``path``; None (with the reason logged) where it is absent or unreadable."""
    if not path.is_file():
        log.info("no %s at %s", path.name, path.parent)
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: not readable JSON (%s)", path, exc)
        return None
    return figures_of(document) if isinstance(document, dict) else None


def path_name(path: object) -> str | None:
    """The last part of a recorded path (a data set's folder, a weights file): what a visitor needs, not where it
    lies."""
    return Path(str(path)).name or None if path else None
