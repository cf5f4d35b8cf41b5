"""metrics.json's typed parts: its headline figures, where they came from (``source.data``) and how the model
was trained (``training``), each written and read through one dataclass here.

A library, not a command. core/evaluation/pipeline.py writes the file (format ``lesion-sweep/evaluation``),
core.final_train its ``training`` (:class:`TrainingRecord`); whoever shows a model's test figures later (the
server's page and ``/info``, serve/facts.py; core.final_train's report page) reads them here instead of by string
keys of its own::

    figures = read_evaluation_figures(Path("results/<sweep>/final/metrics.json"))   # None: absent or unreadable
    training = training_of(document)                                               # None: not a final training

The report's tables of the other sections (calibration, TTA, operating points, subgroups) are read back by
core/evaluation/tables.py, beside core/evaluation/sections.py that writes them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceData:
    """metrics.json's ``source.data``: the dataset an evaluation read."""

    path: str                      # its folder, as given
    layout: str                    # core/data/layouts.py's name for it
    fingerprint: str               # core.data.dataset's fingerprint of its listing
    class_names: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "class_names": list(self.class_names)}


@dataclass(frozen=True)
class SweepMetric:
    """The winning trial's figure in the sweep (best.json's metric)."""

    name: str
    value: float
    mode: str                      # "max" or "min"


@dataclass(frozen=True)
class TrainingRecord:
    """metrics.json's ``training``: core.final_train's account of the training that made the model."""

    best_json: str                 # the sweep's best.json, resolved
    trial_id: str
    sweep_metric: SweepMetric
    tuned_epochs: int              # the epochs the sweep's trials ran
    epochs: int                    # the epochs asked for
    train_splits: tuple[str, ...]  # ("train",) or ("train", "val")
    split_sizes: Mapping[str, int]  # images per split: train, val, test
    chosen_epoch: int              # the epoch whose weights are the model (1-based)
    chosen_by: str                 # the select metric, or "last epoch" when trained on train+val
    epochs_run: int
    chosen_epoch_metrics: Mapping[str, float]  # that epoch's row of metrics.csv
    device: str
    wall_s: float                  # the whole command, figures included

    @property
    def trained_on_val(self) -> bool:
        return "val" in self.train_splits

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train_splits": list(self.train_splits)}


def source_data_of(document: Mapping[str, Any]) -> SourceData | None:
    """The ``source.data`` of a metrics.json document; None where it has none or not this schema."""
    section = (document.get("source") or {}).get("data")
    record = _record(SourceData, section)
    return None if record is None else SourceData(**{**record, "class_names": tuple(record["class_names"])})


def training_of(document: Mapping[str, Any]) -> TrainingRecord | None:
    """The ``training`` of a metrics.json document; None for core.evaluate's (no training) or another schema."""
    record = _record(TrainingRecord, document.get("training"))
    metric = _record(SweepMetric, record and record["sweep_metric"])
    if record is None or metric is None:
        return None
    return TrainingRecord(**{**record, "sweep_metric": SweepMetric(**metric),
                             "train_splits": tuple(record["train_splits"])})


def _record(kind: type, section: object) -> dict[str, Any] | None:
    """``section``'s entries that are ``kind``'s fields, where it has every one (an older or foreign file: None)."""
    names: Sequence[str] = [f.name for f in fields(kind)]
    if not isinstance(section, Mapping) or any(name not in section for name in names):
        return None
    return {name: section[name] for name in names}


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
    source, training = document.get("source") or {}, training_of(document)
    data = source_data_of(document)
    return EvaluationFigures(
        balanced_accuracy=document.get("test_balanced_accuracy"),
        balanced_accuracy_ci=(document.get("intervals") or {}).get("test_balanced_accuracy"),
        accuracy=document.get("test_accuracy"), auc=document.get("test_auc"), n_images=document.get("n_images"),
        split=source.get("split"),
        data=DataFacts(name=path_name(data.path), layout=data.layout, classes=len(data.class_names) or None)
        if data else DataFacts(None, None, None),
        split_sizes=training.split_sizes if training else None, epochs_run=training.epochs_run if training else None)


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
