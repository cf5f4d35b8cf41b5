"""An ensemble model file (``final/ensemble.pt``): several model files in one, used like one model.

core.final_train writes it from the members a sweep chose (core/ensemble_file.py, core/final_ensemble.py);
``core.evaluate``, ``core.predict`` and ``python -m serve`` take it where they take a model.pt, because
core/model/loading.py's ``load_for_inference`` returns an :class:`EnsembleModel` for it, with LoadedModel's interface:

- probabilities are the weighted mean of the members' raw probabilities, each member at its own architecture,
  image size (images are given at the ensemble's size, the largest member's, and resized for a smaller member)
  and clinical fields; TTA is each member's own (core/model/tta.py), and the ensemble's temperature (fitted on the
  averaged validation probabilities) calibrates the mean;
- clinical fields is the members' encodings side by side (``encode``), each member reading its own columns;
- :meth:`EnsembleModel.predict_detail`'s ``disagreement`` is the members' disagreement: the weighted mutual
  information between member and prediction, H(mean p) - mean H(p_k), in nats (0: all members agree; at most log
  of the member count);
- ``model`` is an :class:`EnsembleNet`, which core/explain/gradcam.py explains as the weighted mean of its members'
  maps.

The file is self-contained: each member's whole model file is inside it (so it can be copied and served alone);
a member that cannot be read is a one-line error naming the member and the file. Format, version 1 (torch.save,
loadable with ``weights_only=True``)::

    {"format": "lesion-sweep/ensemble", "version": 1, "class_names": [...], "image_size": int,
     "members": [{"name": str, "source": str, "weight": float, "model": <a model file's contents>}, ...],
     "config": {...},                     # the first (heaviest) member's config: batch size, precision, device
     "calibration": {...}, "operating_points": {...},   # fitted on the averaged validation probabilities
     "ensemble": {...}}                   # how it was chosen (ensemble.json's members, steps, values)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from core.io.atomic import save_torch
from core.model.calibration import apply_temperature
from core.config import TrainConfig
from core.device import resolve_device
from core.errors import UserError
from core.model.inference import ENSEMBLE_FORMAT, LoadedModel, is_ensemble_payload, loaded_from, stored_temperature
from core.model.fields import MetadataSource, encode_dataset, encode_records
from core.model.networks import FUSION_KEY, MODEL_ADVICE, arch_of, model_from_payload, read_model_payload

ENSEMBLE_VERSION = 1


@dataclass(frozen=True)
class EnsemblePrediction:
    probs: np.ndarray             # [N, C] the weighted mean (calibrated where asked)
    member_probs: np.ndarray      # [M, N, C] each member's raw probabilities
    disagreement: np.ndarray      # [N] mutual information between member and prediction, nats


class EnsembleNet(nn.Module):
    """The members' networks as one module, for Grad-CAM (core/explain/gradcam.py ``ensemble_maps``) and device
    moves."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], sizes: Sequence[int],
                 widths: Sequence[int]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.weights, self.sizes, self.widths = list(map(float, weights)), list(map(int, sizes)), list(map(int, widths))
        self.lesion_arch = arch_of(members[0])   # the Grad-CAM layer is chosen as for the first member

    def parts(self) -> list[tuple[nn.Module, float, int, slice]]:
        """(member, weight, image size, its columns of the ensemble's encoded clinical fields) of each member."""
        starts = np.cumsum([0, *self.widths])
        return [(m, w, s, slice(int(a), int(b))) for m, w, s, a, b in
                zip(self.members, self.weights, self.sizes, starts[:-1], starts[1:])]


@dataclass(frozen=True)
class EnsembleModel:
    """An ensemble file ready for inference: LoadedModel's interface (core/model/inference.py)."""

    members: tuple[LoadedModel, ...]
    weights: np.ndarray           # [M], summing to 1
    header: dict[str, Any]        # the file's contents without the members' weights
    config: TrainConfig
    device: torch.device
    model: EnsembleNet
    _warned: list = field(default_factory=list, repr=False, compare=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.header["class_names"])

    @property
    def image_size(self) -> int:
        """The side of the square images it takes (an ensemble: its largest member's)."""
        return int(self.header["image_size"])

    @property
    def arch(self) -> str:
        return self.members[0].arch

    @property
    def widths(self) -> list[int]:
        return [0 if m.fusion is None else int(m.fusion["width"]) for m in self.members]

    @property
    def fusion(self) -> dict | None:
        """None when no member takes clinical fields; else the members' encodings side by side."""
        return self.header.get(FUSION_KEY)

    def encode(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return np.concatenate([encode_records(records, m.fusion) for m in self.members], axis=1)

    def encode_dataset(self, data: MetadataSource, idx: np.ndarray) -> np.ndarray | None:
        if self.fusion is None or data.metadata is None:
            return None if self.fusion is None else self.members[0].encode_dataset(data, idx)
        return np.concatenate([np.zeros((len(idx), 0), np.float32) if m.fusion is None
                               else encode_dataset(data, m.fusion)[idx] for m in self.members], axis=1)

    def temperature(self, tta: bool = False) -> float | None:
        return stored_temperature(self.header, tta)

    def predict(self, images_uint8: np.ndarray | torch.Tensor, *, tta: bool = False, calibrated: bool = True,
                clinical: np.ndarray | None = None) -> np.ndarray:
        """Probabilities [N, C]: the weighted mean of the members', then the ensemble's temperature."""
        return self.predict_detail(images_uint8, tta=tta, calibrated=calibrated, clinical=clinical).probs

    def predict_detail(self, images_uint8: np.ndarray | torch.Tensor, *, tta: bool = False, calibrated: bool = True,
                       clinical: np.ndarray | None = None) -> EnsemblePrediction:
        if self.fusion is not None and clinical is not None \
                and np.shape(clinical) != (len(images_uint8), int(self.fusion["width"])):
            raise UserError(f"clinical fields of shape {np.shape(clinical)} for {len(images_uint8)} images; expected "
                            f"({len(images_uint8)}, {self.fusion['width']}) (EnsembleModel.encode)")
        member_probs = np.stack([
            member.predict(resized(images_uint8, member.image_size), tta=tta, calibrated=False,
                           clinical=None if clinical is None or member.fusion is None else clinical[:, cols])
            for member, (_, _, _, cols) in zip(self.members, self.model.parts())])
        mean = np.tensordot(self.weights, member_probs, axes=1)
        temperature = self.temperature(tta) if calibrated else None
        probs = mean if temperature is None else apply_temperature(mean, temperature)
        return EnsemblePrediction(probs=probs, member_probs=member_probs,
                                  disagreement=mutual_information(member_probs, self.weights))


def mutual_information(member_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """H(sum_k w_k p_k) - sum_k w_k H(p_k) per image [N], in nats: the members' disagreement."""
    def entropy(p: np.ndarray) -> np.ndarray:
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)

    mean = np.tensordot(weights, member_probs, axes=1)
    return np.maximum(entropy(mean) - np.tensordot(weights, entropy(member_probs), axes=1), 0.0)


# The members' disagreement in words (mutual information, nats): below the first bound they agree; from the second
# on they disagree enough that the answer should be read as uncertain. Two members that are each sure of a different
# class reach log 2 = 0.69; these bounds are a reading aid, not a calibrated test.
DISAGREEMENT_WORDS = ((0.05, "the ensemble's members agree"),
                      (0.2, "the ensemble's members differ somewhat"),
                      (float("inf"), "the ensemble's members disagree: read this answer as uncertain"))


def describe_disagreement(value: float) -> str:
    """The members' disagreement in words (DISAGREEMENT_WORDS), with its value."""
    words = next(text for bound, text in DISAGREEMENT_WORDS if value < bound)
    return f"{words} (mutual information {value:.3f} nats)"


def resized(images_uint8: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """uint8 images [N, 3, S, S] at ``size`` px (bilinear, antialiased); unchanged when already that size."""
    if images_uint8.shape[-1] == size and images_uint8.shape[-2] == size:
        return images_uint8
    x = torch.as_tensor(np.asarray(images_uint8) if not isinstance(images_uint8, torch.Tensor) else images_uint8)
    out = nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.round().clamp(0, 255).to(torch.uint8)
    return out if isinstance(images_uint8, torch.Tensor) else out.numpy()


# --- the file --------------------------------------------------------------------------------------------------

def save_ensemble_file(path: str | os.PathLike, members: Sequence[tuple[str, str | os.PathLike, float]],
                       extra: Mapping[str, Any] | None = None, advice: str = MODEL_ADVICE) -> None:
    """Write an ensemble of the model files ``members`` ((name, file, weight), heaviest first; weights are
    normalised) with ``extra`` (calibration, operating_points, ensemble). A member file that is missing,
    damaged or of other classes is a one-line error naming it."""
    save_torch(ensemble_document(members, extra, advice), path)


def ensemble_document(members: Sequence[tuple[str, str | os.PathLike, float]],
                      extra: Mapping[str, Any] | None = None, advice: str = MODEL_ADVICE) -> dict[str, Any]:
    """The contents of an ensemble file (:func:`save_ensemble_file`; :func:`ensemble_from_payload` reads it)."""
    payloads = [_member_payload(name, source, advice) for name, source, _ in members]
    classes = payloads[0]["class_names"]
    for (name, source, _), payload in zip(members, payloads):
        if list(payload["class_names"]) != list(classes):
            raise UserError(f"{source}: ensemble member {name} has classes {payload['class_names']}, the first "
                            f"member {classes}; an ensemble's members must share their classes")
    total = float(sum(w for _, _, w in members))
    document = {"format": ENSEMBLE_FORMAT, "version": ENSEMBLE_VERSION, "class_names": list(classes),
                "image_size": max(int(p["image_size"]) for p in payloads),
                "members": [{"name": name, "source": str(source), "weight": float(w) / total, "model": payload}
                            for (name, source, w), payload in zip(members, payloads)],
                "config": dict(payloads[0]["config"]), **dict(extra or {})}
    return document


def _member_payload(name: str, source: str | os.PathLike, advice: str) -> dict[str, Any]:
    try:
        payload = read_model_payload(source, advice)
        if is_ensemble_payload(payload):
            raise UserError(f"{source}: an ensemble file; an ensemble's members are single models")
        model_from_payload(payload, source)  # the weights must fit, now rather than when the ensemble is used
    except UserError as exc:
        text = str(exc) if advice in str(exc) or advice == MODEL_ADVICE else f"{exc}; {advice}"
        raise UserError(f"ensemble member {name}: {text}") from None
    return dict(payload)


def ensemble_from_payload(payload: Mapping[str, Any], path: str | os.PathLike, device: str = "auto") -> EnsembleModel:
    """An ensemble file's contents (read by core.model.loading.load_for_inference) ready for inference."""
    if payload.get("version") != ENSEMBLE_VERSION or not isinstance(payload.get("members"), list) \
            or not payload["members"]:
        raise UserError(f"{path}: unsupported ensemble file (version {payload.get('version')!r}, or no members)")
    members = []
    for k, entry in enumerate(payload["members"], 1):
        name = entry.get("name", str(k)) if isinstance(entry, Mapping) else str(k)
        label = f"{path} (member {name}, from {entry.get('source') if isinstance(entry, Mapping) else '?'})"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("weight"), (int, float)):
            raise UserError(f"{label}: damaged member entry; write the ensemble again (core.final_train)")
        members.append(loaded_from(*model_from_payload(entry.get("model"), label), label, device))
    weights = np.array([float(e["weight"]) for e in payload["members"]])
    weights = weights / weights.sum()
    header = {k: v for k, v in payload.items() if k != "members"}
    header["members"] = [{k: v for k, v in e.items() if k != "model"} for e in payload["members"]]
    widths = [0 if m.fusion is None else int(m.fusion["width"]) for m in members]
    header[FUSION_KEY] = None if not any(widths) else {
        "method": "ensemble", "width": int(sum(widths)), "members": [m.fusion for m in members]}
    header["arch"] = members[0].arch
    try:
        cfg = replace(TrainConfig.from_dict(payload.get("config") or {}), device=device)
    except UserError as exc:
        raise UserError(f"{path}: the ensemble's config is not valid here ({exc})") from None
    torch_device = resolve_device(cfg)
    net = EnsembleNet([m.model for m in members], weights, [m.image_size for m in members], widths)
    return EnsembleModel(members=tuple(members), weights=weights, header=header, config=cfg, device=torch_device,
                         model=net.to(torch_device).eval())


def load_ensemble(path: str | os.PathLike, device: str = "auto") -> EnsembleModel:
    """Read an ensemble file (``core.model.loading.load_for_inference`` reads either kind)."""
    payload = read_model_payload(path)
    if not is_ensemble_payload(payload):
        raise UserError(f"{path}: not an ensemble file (format '{ENSEMBLE_FORMAT}')")
    return ensemble_from_payload(payload, path, device)
