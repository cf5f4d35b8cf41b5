"""ResNet-18 with a new head, its initial weights, and the project's model file.

ImageNet weights come through torchvision's weights API, which looks in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) before downloading. Where they cannot be had the run fails with
a message saying how to fix it: it never falls back to random weights silently.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from core.atomic import save_torch
from core.errors import UserError
from core.state_files import load_torch

log = logging.getLogger(__name__)

# What to do about a model file that cannot be read (a copy cut short, a disk error); callers that know
# better (core.final_train: train again) pass their own.
MODEL_ADVICE = ("copy it again if it was copied, or write it again (core.final_train writes model.pt, "
                "core.train best.pt)")
MODEL_FORMAT = "lesion-sweep/model"
MODEL_VERSION = 1
ARCH = "resnet18"


def build_model(num_classes: int, pretrained: str) -> nn.Module:
    """ResNet-18 whose 1000-way ImageNet head is replaced by a ``num_classes``-way one."""
    model = resnet18(weights=None)
    if pretrained == "imagenet":
        model.load_state_dict(_imagenet_state_dict())
    elif pretrained != "none":
        _load_backbone_file(model, Path(pretrained))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    weights = ResNet18_Weights.IMAGENET1K_V1
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cache.is_file():
        log.info("ImageNet weights from the torch hub cache: %s", cache)
    else:
        log.info("ImageNet weights not in %s: downloading %s", cache, weights.url)
    try:
        # get_state_dict uses the hub cache when the file is there and downloads otherwise.
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # URLError, RuntimeError on a bad hash, OSError ...
        raise UserError(
            f"cannot get the ImageNet weights for ResNet-18 ({type(exc).__name__}: {exc}); without network, "
            f"copy {os.path.basename(weights.url)} into {cache.parent} (the torch hub cache; set TORCH_HOME to "
            f"move it), pass a state_dict file with --set pretrained=PATH, or train from scratch with "
            f"--set pretrained=none") from None


def _load_backbone_file(model: nn.Module, path: Path) -> None:
    """Load a state_dict (or one of this project's model files) into everything but the head."""
    state = _torch_load(path, "pass a complete state_dict file with --set pretrained=PATH")
    if isinstance(state, Mapping) and state.get("format") == MODEL_FORMAT:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(f"{path}: not a ResNet-18 state_dict ({str(exc).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(f"{path}: not a ResNet-18 state_dict ({len(missing)} missing keys, "
                        f"{len(unexpected)} unexpected, e.g. '{first}')")
    log.info("initial weights from %s", path)


def _torch_load(path: Path, advice: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    return load_torch(path, advice)


GRADCAM_LAYERS = ("layer2", "layer3", "layer4")   # ResNet-18's residual stages Grad-CAM may look at
STAGE_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def gradcam_layer(model: nn.Module, name: str = "layer4") -> nn.Module:
    """The residual stage ``name`` (layer2, layer3 or layer4): where Grad-CAM looks."""
    if name not in STAGE_STRIDES:
        raise ValueError(f"unknown residual stage {name!r}; expected one of {tuple(STAGE_STRIDES)}")
    return getattr(_unwrap(model), name)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


def save_model_file(path: str | os.PathLike, model: nn.Module, class_names: tuple[str, ...] | list[str],
                    config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    """Write the model with everything needed to use it; loadable with ``weights_only=True``."""
    state = {k: v.detach().to("cpu") for k, v in _unwrap(model).state_dict().items()}
    payload = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "arch": ARCH, "state_dict": state,
               "class_names": list(class_names), "config": dict(config),
               "image_size": int(config["image_size"]), **dict(extra or {})}
    save_torch(payload, path)


def load_model_file(path: str | os.PathLike, device: str | torch.device = "cpu",
                    advice: str = MODEL_ADVICE) -> tuple[nn.Module, dict]:
    """Read a model file written by :func:`save_model_file`; returns ``(model in eval mode, metadata)``.

    A file that cannot be read is a UserError ending with ``advice`` (what the user can do about it).
    """
    path = Path(path)
    payload = _torch_load(path, advice)
    if not isinstance(payload, Mapping) or payload.get("format") != MODEL_FORMAT:
        raise UserError(f"{path}: not a lesion-sweep model file (no format '{MODEL_FORMAT}')")
    if payload.get("version") != MODEL_VERSION or payload.get("arch") != ARCH:
        raise UserError(f"{path}: unsupported model file version {payload.get('version')!r} / "
                        f"arch {payload.get('arch')!r}")
    class_names = list(payload.get("class_names") or [])
    model = resnet18(weights=None, num_classes=len(class_names))
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: weights do not fit a ResNet-18 with {len(class_names)} classes "
                        f"({str(exc).splitlines()[0]})") from None
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.to(device).eval(), meta
