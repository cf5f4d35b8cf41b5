"""``core.evaluate --fit-ood``: fit the out-of-distribution check and the abstention rule for an older model file.

core.final_train fits both on the validation split and stores them in model.pt; a model file written before
(or a best.pt of core.train) has neither. ``--fit-ood`` fits them on the validation split of the run's
splits.csv (``--splits``, else the splits.csv beside the model file), with the model file's own temperature,
and writes a copy of the model file with them into ``--out`` (``model.pt``); the given file is left as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core import filenames
from core.model import ood
from core.model.abstain import DEFAULT_COVERAGE
from core.model.checked_prediction import fit_checks
from core.errors import UserError
from core.model.inference import SINGLE_MODE, LoadedModel
from core.evaluation.metrics import map_labels
from core.model.networks import FUSION_KEY, save_model_file

if TYPE_CHECKING:
    from core.data.dataset import Dataset

log = logging.getLogger(__name__)


def splits_for_fit(checkpoint: str | Path, splits: str | None) -> str:
    """The splits.csv whose val split --fit-ood fits on: ``--splits``, else the one beside the model file."""
    if splits:
        return splits
    beside = Path(checkpoint).parent / filenames.SPLITS
    if not beside.is_file():
        raise UserError(f"--fit-ood fits on the validation split of the model's run: no {beside}; pass the run's "
                        f"splits.csv with --splits")
    return str(beside)


def fit_for_file(loaded: LoadedModel, data: Dataset, source: str, out: Path,
                 coverage: float | None = None) -> dict[str, Any]:
    """Fit on ``data``'s val split; write ``out``/model.pt with the statistics; returns them (``ood``,
    ``abstention``) merged over the model file's own header."""
    val = data.indices("val")
    if len(val) == 0:
        raise UserError(f"{source}: its split has no validation images to fit the out-of-distribution check on")
    labels = map_labels(data.class_names, loaded.class_names, data.labels[val], source)
    log.info("--fit-ood: fitting the out-of-distribution check and the abstention rule on %d validation images",
             len(val))
    with ood.capture(loaded.model) as seen:
        raw = loaded.predict(np.asarray(data.images[val]), calibrated=False, clinical=loaded.encode_dataset(data, val))
    fitted = fit_checks(labels, {SINGLE_MODE: raw}, {SINGLE_MODE: loaded.temperature(False)}, seen,
                        loaded.class_names, DEFAULT_COVERAGE if coverage is None else coverage)
    header = {**loaded.header, **fitted}
    kept = {k: v for k, v in header.items() if k not in ("format", "version", "arch", "class_names", "config",
                                                       "image_size", FUSION_KEY)}
    out.mkdir(parents=True, exist_ok=True)
    save_model_file(out / filenames.MODEL, loaded.model, loaded.class_names, loaded.header.get("config") or {}, kept)
    log.info("--fit-ood: the model file with them: %s", out / filenames.MODEL)
    return header
