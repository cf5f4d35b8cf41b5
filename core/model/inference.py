"""Use a trained model: load a model file for inference and predict class probabilities of uint8 images.

Every command that applies a model (core.evaluate, core.predict, core.final_train) goes through here,
so images are normalised, batched and cast exactly as in training (core/training/loop.py's ``predict_split``).
``tta=True`` averages the 8 dihedral views (core/model/tta.py); ``LoadedModel.predict`` applies the temperature
that core.final_train stored in model.pt for that mode (core/model/calibration.py) unless ``calibrated=False``.
A model trained with clinical fields (core/model/fields.py) takes it encoded (``LoadedModel.encode``); without
it every field counts as unknown, with a warning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from core.model.calibration import apply_temperature
from core.config import DEFAULT_ARCH, TrainConfig
from core.device import Placement, as_tensor, resolve_device
from core.errors import UserError
from core.model.forward import predict_split
from core.model.networks import FUSION_KEY
from core.model.fields import MetadataSource, encode_dataset, encode_records
from core.model.tta import N_VIEWS, DihedralMean

SINGLE_MODE, TTA_MODE = "single", "tta"  # keys of the temperatures stored in model.pt
ENSEMBLE_FORMAT = "lesion-sweep/ensemble"  # an ensemble model file's format (core/model/ensemble.py)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model file ready for inference."""

    model: nn.Module              # on ``device``, in eval mode
    header: dict[str, Any]        # the model file's header (class_names, image_size, config, epoch, ...)
    config: TrainConfig           # the config it was trained with, ``device`` replaced by the one asked for
    device: torch.device
    _warned: list = field(default_factory=list, repr=False, compare=False)  # the no-clinical-fields warning, once

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.header["class_names"])

    @property
    def image_size(self) -> int:
        """The side of the square images it takes."""
        return int(self.header["image_size"])

    @property
    def arch(self) -> str:
        return str(self.header.get("arch") or DEFAULT_ARCH)

    @property
    def fusion(self) -> dict | None:
        """The clinical-field encoding the model was trained with; None for an image-only model."""
        return self.header.get(FUSION_KEY)

    def encode(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Records ({"age", "sex", "site"}) encoded for :meth:`predict`; [N, 0] for an image-only model."""
        return encode_records(records, self.fusion)

    def encode_dataset(self, data: MetadataSource, idx: np.ndarray) -> np.ndarray | None:
        """The encoded clinical fields of ``data``'s images ``idx`` (a core.data.dataset.Dataset); None for an
        image-only model.

        A dataset without metadata (ImageFolder) gives None, and the model then treats every field as unknown.
        """
        if self.fusion is None:
            return None
        if data.metadata is None:
            log.warning("%s has no metadata (age, sex, localization); the model was trained with them, so "
                        "every field is treated as unknown", data.root)
            return None
        return encode_dataset(data, self.fusion)[idx]

    def temperature(self, tta: bool = False) -> float | None:
        """The calibration temperature stored for single-view (or TTA) prediction; None when uncalibrated."""
        return stored_temperature(self.header, tta)

    def predict(self, images_uint8: np.ndarray | torch.Tensor, *, tta: bool = False, calibrated: bool = True,
                clinical: np.ndarray | None = None) -> np.ndarray:
        """Probabilities [N, C]; calibrated with the stored temperature where the file has one.

        ``clinical``: the images' encoded clinical fields [N, D] (:meth:`encode`); ignored by an image-only model,
        and for a model with clinical fields None means every field unknown (a warning, once).
        """
        if self.fusion is None:
            clinical = None
        elif clinical is None:
            if not self._warned:
                self._warned.append(True)
                log.warning("the model was trained with clinical fields (%s) but none was given: age, sex "
                            "and site are treated as unknown", self.fusion["method"])
        elif np.shape(clinical) != (len(images_uint8), int(self.fusion["width"])):
            raise UserError(f"clinical fields of shape {np.shape(clinical)} for {len(images_uint8)} images; expected "
                            f"({len(images_uint8)}, {self.fusion['width']}) (LoadedModel.encode)")
        probs = predict_probs(self.model, images_uint8, self.device, self.config.eval_batch_size,
                              self.config.precision, tta=tta, clinical=clinical)
        temperature = self.temperature(tta) if calibrated else None
        return probs if temperature is None else apply_temperature(probs, temperature)


def loaded_from(model: nn.Module, header: dict[str, Any], path: str | os.PathLike, device: str) -> LoadedModel:
    """A read model file (core.model.networks.model_from_payload) ready for inference on ``device``."""
    try:
        cfg = replace(TrainConfig.from_dict(header.get("config") or {}), device=device)
    except UserError as exc:
        raise UserError(f"{path}: the model's config is not valid here ({exc})") from None
    torch_device = resolve_device(cfg)
    return LoadedModel(model=model.to(torch_device), header=header, config=cfg, device=torch_device)


def stored_temperature(header: Mapping[str, Any], tta: bool) -> float | None:
    """The temperature a model file (or an ensemble file) stores for single-view (or TTA) prediction, or None."""
    stored = (header.get("calibration") or {}).get("temperature") or {}
    value = stored.get(TTA_MODE if tta else SINGLE_MODE)
    return None if value is None else float(value)


def is_ensemble_payload(payload: object) -> bool:
    return isinstance(payload, Mapping) and payload.get("format") == ENSEMBLE_FORMAT


def predict_probs(model: nn.Module, images_uint8: np.ndarray | torch.Tensor, device: str | torch.device = "cpu",
                  batch_size: int = 256, precision: str = "auto", tta: bool = False,
                  clinical: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities [N, C] of a model for uint8 images [N, 3, S, S] (``tta``: mean over 8 views);
    ``clinical``: their encoded clinical fields [N, D] for a model with clinical fields (None: every field unknown)."""
    where = Placement.of(torch.device(device), precision)
    images = as_tensor(images_uint8).to(where.device)
    if tta:  # the 8 views of a batch run as one: keep the batch's memory as without TTA
        model, batch_size = DihedralMean(model), max(1, batch_size // N_VIEWS)
    tensor = None if clinical is None else torch.as_tensor(np.asarray(clinical, np.float32), device=where.device)
    probs, _ = predict_split(model.to(where.device), images, np.arange(len(images)), None, where, batch_size, tensor)
    return probs
