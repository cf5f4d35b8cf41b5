"""A model file's header read back: the one typed reader of what model.pt and ensemble.pt record beside the weights.

A library, not a command. core/model/networks.py (``save_model_file``) and core/model/ensemble.py write the
header; whoever describes a model (the server's facts, serve/facts.py) reads it here instead of by string keys
of its own::

    header = header_of(loaded.header)
    header.arch, header.class_names, header.image_size, header.temperature, header.members
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from core.config import DEFAULT_ARCH
from core.model.networks import FUSION_KEY


@dataclass(frozen=True)
class Member:
    """One member of an ensemble file and its weight in the mean."""

    name: str | None
    weight: float | None


@dataclass(frozen=True)
class ModelHeader:
    arch: str
    class_names: tuple[str, ...]
    image_size: int
    epoch: int | None                       # the epoch chosen on val (core.final_train); None in an ensemble file
    epochs: int | None                      # the config's training length
    pretrained: str | None                  # the config's initial weights: 'imagenet', 'none' or a file
    temperature: Mapping[str, float | None] | None   # per view, fitted on val; None where none was fitted
    fitted_on: str | None                   # where the temperature was fitted ("val")
    not_calibrated: str | None              # why there is no temperature, where the file says
    has_clinical_fields: bool               # the model takes age, sex and site (config key ``metadata``)
    members: tuple[Member, ...]             # an ensemble file's members (empty for a single model)

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)


def header_of(header: Mapping[str, Any]) -> ModelHeader:
    """The header of a read model file (``LoadedModel.header``, an ensemble's ``header``); absent entries as None."""
    config = header.get("config") or {}
    calibration = header.get("calibration") or {}
    return ModelHeader(
        arch=header.get("arch") or DEFAULT_ARCH, class_names=tuple(header.get("class_names") or ()),
        image_size=int(header.get("image_size") or config.get("image_size") or 0),
        epoch=header.get("epoch"), epochs=config.get("epochs"), pretrained=config.get("pretrained"),
        temperature=calibration.get("temperature") or None, fitted_on=calibration.get("fitted_on"),
        not_calibrated=calibration.get("skipped"), has_clinical_fields=header.get(FUSION_KEY) is not None,
        members=tuple(Member(m.get("name"), m.get("weight")) for m in header.get("members") or ()))
