"""The backbones (torchvision's), their new heads, optional clinical-field fusion, and the model file.

``arch`` (core/config.py ARCHS) picks a torchvision classifier; its last linear layer is replaced by one for
the dataset's classes. ImageNet weights come through torchvision's weights API, which looks in the torch hub
cache (``$TORCH_HOME/hub/checkpoints``) before downloading. Where they cannot be had the run fails with a
message naming the file and the folder it belongs in: it never falls back to random weights silently.

With clinical fields (config ``metadata``, core/model/fields.py) the backbone's last linear layer becomes the
identity, and :class:`FusionNet` fuses its pooled features with a small MLP of the encoded age, sex and site: ``concat``
(joined before the classifier) or ``film`` (the MLP gives a per-feature scale and shift, Perez et al. 2018).

The model file records ``arch`` and the fusion spec (key ``FUSION_KEY``; None: image only); :func:`load_model_file`
builds what it records, so every command loads any of them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights

from core.io.atomic import save_torch
from core.model.box_head import ATTRIBUTE as BOX_HEAD, BoxHead
from core.config import ARCHS, DEFAULT_ARCH
from core.errors import UserError
from core.model.fields import unknown_rows
from core.io.state_files import load_torch

log = logging.getLogger(__name__)

# What to do about a model file that cannot be read (a copy cut short, a disk error); callers that know
# better (core.final_train: train again) pass their own.
MODEL_ADVICE = ("copy it again if it was copied, or write it again (core.final_train writes model.pt, "
                "core.train best.pt)")
MODEL_FORMAT = "lesion-sweep/model"
MODEL_VERSION = 1
# Where each family keeps the linear layer that is replaced (a path of attributes / indices).
HEADS = {"resnet18": ("fc",), "resnet34": ("fc",), "resnet50": ("fc",), "regnet_y_800mf": ("fc",),
         "efficientnet_b0": ("classifier", 1), "convnext_tiny": ("classifier", 2),
         "mobilenet_v3_large": ("classifier", 3)}
NAMES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50",
         "efficientnet_b0": "EfficientNet-B0", "convnext_tiny": "ConvNeXt-Tiny",
         "mobilenet_v3_large": "MobileNetV3-Large", "regnet_y_800mf": "RegNetY-800MF"}
FUSION_HIDDEN = 32         # width of the clinical-field MLP: 18 inputs need little
FUSION_KEY = "metadata"    # the model file's key of the fusion spec (its older name, kept so older files load)


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise UserError(f"unknown arch '{arch}' (expected one of {', '.join(ARCHS)})")
    return arch


def build_model(num_classes: int, pretrained: str, arch: str = DEFAULT_ARCH,
                fusion: Mapping[str, Any] | None = None, box_head: bool = False) -> nn.Module:
    """``arch`` with a ``num_classes``-way head; with a fusion spec, a :class:`FusionNet` around it;
    ``box_head``: with a core.model.box_head.BoxHead on the classifier layer's input."""
    model = get_model(check_arch(arch), weights=None)
    if pretrained == "imagenet":
        model.load_state_dict(_imagenet_state_dict(arch))
    elif pretrained != "none":
        _load_backbone_file(model, Path(pretrained), arch)
    parent, key = _head_slot(model, arch)
    features = _get(parent, key).in_features
    if fusion is not None:
        _set(parent, key, nn.Identity())
        net = FusionNet(model, features, dict(fusion), num_classes, arch)
        if box_head:
            setattr(net, BOX_HEAD, BoxHead(features, ("backbone", *HEADS[arch])))
        return net
    _set(parent, key, nn.Linear(features, num_classes))
    model.lesion_arch = arch  # a plain attribute, not in the state_dict: the file stays torchvision's
    if box_head:  # its weights are the state_dict's box_head.*, the only keys a torchvision model lacks
        setattr(model, BOX_HEAD, BoxHead(features, HEADS[arch]))
    return model


class FusionNet(nn.Module):
    """A backbone (its head the identity) fused with an MLP of the encoded clinical fields."""

    def __init__(self, backbone: nn.Module, features: int, spec: dict[str, Any], num_classes: int,
                 arch: str) -> None:
        super().__init__()
        self.backbone, self.spec, self.lesion_arch = backbone, spec, arch
        self.meta_mlp = nn.Sequential(  # the name is in saved weights' keys: it stays
            nn.Linear(int(spec["width"]), FUSION_HIDDEN), nn.ReLU(), nn.Linear(FUSION_HIDDEN, FUSION_HIDDEN), nn.ReLU())
        if spec["method"] == "film":
            self.film = nn.Linear(FUSION_HIDDEN, 2 * features)
            nn.init.zeros_(self.film.weight)  # starts as the identity: scale 1, shift 0
            nn.init.zeros_(self.film.bias)
            self.head = nn.Linear(features, num_classes)
        else:
            self.head = nn.Linear(features + FUSION_HIDDEN, num_classes)
        self.register_buffer("unknown", torch.from_numpy(unknown_rows(1, spec)), persistent=False)

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of images ``x`` with encoded clinical fields ``clinical`` [B, width]; None: every field unknown."""
        pooled = self.backbone(x)
        if clinical is None:
            # x.shape, not len(x): the ONNX export keeps the batch dynamic
            clinical = self.unknown.expand(x.shape[0], -1)
        m = self.meta_mlp(clinical.to(pooled.dtype))
        if self.spec["method"] == "film":
            scale, shift = self.film(m).chunk(2, dim=1)
            return self.head(pooled * (1 + scale) + shift)
        return self.head(torch.cat([pooled, m], dim=1))


def arch_of(model: nn.Module) -> str:
    return getattr(_unwrap(model), "lesion_arch", DEFAULT_ARCH)


def fusion_of(model: nn.Module) -> dict[str, Any] | None:
    model = _unwrap(model)
    return dict(model.spec) if isinstance(model, FusionNet) else None


def backbone_of(model: nn.Module) -> nn.Module:
    model = _unwrap(model)
    return model.backbone if isinstance(model, FusionNet) else model


def _head_slot(model: nn.Module, arch: str) -> tuple[nn.Module, str | int]:
    *path, key = HEADS[arch]
    parent = model
    for step in path:
        parent = _get(parent, step)
    return parent, key


def _get(parent: nn.Module, key: str | int) -> nn.Module:
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent: nn.Module, key: str | int, module: nn.Module) -> None:
    if isinstance(key, int):
        parent[key] = module
    else:
        setattr(parent, key, module)


def _head_prefix(arch: str) -> str:
    return ".".join(map(str, HEADS[arch])) + "."


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    weights = get_model_weights(arch).IMAGENET1K_V1
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
            f"cannot get the ImageNet weights for {NAMES[arch]} ({type(exc).__name__}: {exc}); without network, "
            f"download {weights.url} and copy {os.path.basename(weights.url)} into {cache.parent} (the torch hub "
            f"cache; set TORCH_HOME to move it), pass a state_dict file with --set pretrained=PATH, or train "
            f"from scratch with --set pretrained=none") from None


def _load_backbone_file(model: nn.Module, path: Path, arch: str) -> None:
    """Load a state_dict (or one of this project's model files) into everything but the head."""
    state = _torch_load(path, "pass a complete state_dict file with --set pretrained=PATH")
    if isinstance(state, Mapping) and state.get("format") == MODEL_FORMAT:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()
             if not k.startswith(BOX_HEAD + ".")}  # a box head is made anew, as the classifier is
    if any(k.startswith("backbone.") for k in state):  # a fused model's file: its backbone only
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head = _head_prefix(arch)
    backbone = {k: v for k, v in state.items() if not k.startswith(head)}
    try:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(f"{path}: not a {NAMES[arch]} state_dict ({str(exc).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(f"{path}: not a {NAMES[arch]} state_dict ({len(missing)} missing keys, "
                        f"{len(unexpected)} unexpected, e.g. '{first}')")
    log.info("initial weights from %s", path)


def read_model_payload(path: str | os.PathLike, advice: str = MODEL_ADVICE) -> Any:
    """The raw contents of a model file (a single model's, or an ensemble's: core/model/ensemble.py)."""
    return _torch_load(Path(path), advice)


def _torch_load(path: Path, advice: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    return load_torch(path, advice)


GRADCAM_LAYERS = ("layer2", "layer3", "layer4")   # a ResNet's residual stages Grad-CAM may look at
# Grad-CAM's layer per family: the last feature stage, where the classifier's evidence is still spatial.
FEATURE_LAYER = "features[-1]"   # EfficientNet, MobileNetV3, ConvNeXt
TRUNK_LAYER = "trunk_output"     # RegNet
STAGE_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32, FEATURE_LAYER: 32, TRUNK_LAYER: 32}


# Every layer name --gradcam-layer accepts; which of them a model has depends on its arch (gradcam_layers).
ALL_GRADCAM_LAYERS = (*GRADCAM_LAYERS, FEATURE_LAYER, TRUNK_LAYER)


def gradcam_layers(arch: str) -> tuple[str, ...]:
    """The layers Grad-CAM may look at in ``arch``, the default (the last) last."""
    if arch.startswith("resnet"):
        return GRADCAM_LAYERS
    return (TRUNK_LAYER,) if arch.startswith("regnet") else (FEATURE_LAYER,)


def gradcam_layer(model: nn.Module, name: str | None = None) -> nn.Module:
    """The layer ``name`` of the model's arch where Grad-CAM looks (None: the arch's default, its last stage).

    A layer the arch lacks (``layer3`` of a ConvNeXt) is a UserError naming the ones it has.
    """
    backbone = backbone_of(model)
    name = check_gradcam_layer(arch_of(model), name)
    if name == FEATURE_LAYER:
        return backbone.features[-1]
    return getattr(backbone, name)


def check_gradcam_layer(arch: str, name: str | None) -> str:
    """``name`` (None: the arch's default) if ``arch`` has it; else a UserError naming the layers it has."""
    allowed = gradcam_layers(arch)
    name = name or allowed[-1]
    if name not in allowed:
        raise UserError(f"Grad-CAM layer '{name}': {NAMES[arch]} ({arch}) has no such layer; its Grad-CAM "
                        f"layer{'s are' if len(allowed) > 1 else ' is'} {', '.join(allowed)}")
    return name


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


def save_model_file(path: str | os.PathLike, model: nn.Module, class_names: tuple[str, ...] | list[str],
                    config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    """Write the model with everything needed to use it; loadable with ``weights_only=True``.

    Records ``arch`` and, under the key ``metadata``, the fusion spec (None for an image-only model).
    """
    state = {k: v.detach().to("cpu") for k, v in _unwrap(model).state_dict().items()}
    payload = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "arch": arch_of(model), "state_dict": state,
               "class_names": list(class_names), "config": dict(config),
               "image_size": int(config["image_size"]), FUSION_KEY: fusion_of(model), **dict(extra or {})}
    save_torch(payload, path)


def load_model_file(path: str | os.PathLike, device: str | torch.device = "cpu",
                    advice: str = MODEL_ADVICE) -> tuple[nn.Module, dict]:
    """Read a model file written by :func:`save_model_file`; returns ``(model in eval mode, header)``.

    Builds the recorded ``arch`` (a file without one holds a ResNet-18) with its clinical-field fusion, if any.
    A file that cannot be read is a UserError ending with ``advice`` (what the user can do about it).
    """
    path = Path(path)
    return model_from_payload(_torch_load(path, advice), path, device)


def model_from_payload(payload: object, path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The model and header of a model file's contents (:func:`load_model_file`); ``path``: what to call it in
    an error (an ensemble file's member: core/model/ensemble.py)."""
    if not isinstance(payload, Mapping) or payload.get("format") != MODEL_FORMAT:
        raise UserError(f"{path}: not a lesion-sweep model file (no format '{MODEL_FORMAT}')")
    arch, spec = payload.get("arch", DEFAULT_ARCH), payload.get(FUSION_KEY)
    if payload.get("version") != MODEL_VERSION or arch not in ARCHS:
        raise UserError(f"{path}: unsupported model file version {payload.get('version')!r} / "
                        f"arch {arch!r}")
    if spec is not None and (not isinstance(spec, Mapping) or "width" not in spec or "method" not in spec):
        raise UserError(f"{path}: unreadable fusion spec {spec!r}")
    class_names = list(payload.get("class_names") or [])
    state = payload.get("state_dict")
    boxes = isinstance(state, Mapping) and any(str(k).startswith(BOX_HEAD + ".") for k in state)
    model = build_model(len(class_names), "none", arch, spec, box_head=boxes)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: weights do not fit a {NAMES[arch]} with {len(class_names)} classes"
                        f"{' and clinical fields' if spec else ''} ({str(exc).splitlines()[0]})") from None
    header = {k: v for k, v in payload.items() if k != "state_dict"}
    header["arch"], header[FUSION_KEY] = arch, None if spec is None else dict(spec)
    return model.to(device).eval(), header
