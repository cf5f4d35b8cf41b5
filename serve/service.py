"""The model behind the routes: calibrated probabilities through the micro-batcher, Grad-CAM under a lock.

Probabilities come from core.model.inference.LoadedModel.predict (the same normalisation, batching and stored
temperature as core.predict), or with ``backend="onnx"`` from ONNX Runtime for single-view requests
(serve/onnx_backend.py; TTA stays on torch). Grad-CAM (core.explain.gradcam, Captum's Guided Grad-CAM) runs on
its own copy of the network, one call at a time: Captum registers hooks on the module it explains for
the duration of a call, which would touch the batcher's forward passes if they shared the module, and
its hooks are not known to be thread-safe.

A model trained with the box head (core/model/box_head.py) gives its lesion box from the same forward pass as the
probabilities (:meth:`ModelService.predict`); Grad-CAM's answer carries the map's box (core/explain/cam_boxes.py).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from core.errors import UserError
from core.model.box_head import box_head_of, capture_boxes, view_boxes
from core.model.checked_prediction import predict_checked
from core.model.ensemble import EnsembleModel
from core.model.inference import LoadedModel
from core.model.loading import load_for_inference
from serve.batcher import MicroBatcher
from serve.facts import model_facts
from serve.verdicts import operating_verdicts

log = logging.getLogger(__name__)

OVERLAY_MIN_SIDE = 224   # overlays of small models are enlarged to this, as core.explain.gradcam.save_overlay does


@dataclass(frozen=True)
class ServeOptions:
    """How the model is served (the command's options)."""

    device: str = "auto"         # 'auto', 'cpu' or 'cuda'
    backend: str = "torch"       # 'torch' or 'onnx' (single-view probabilities through ONNX Runtime)
    max_batch: int = 32          # most images the batcher runs as one forward pass
    max_wait_ms: float = 0.0     # how long the batcher waits for more requests after the first (0: never)
    max_queue: int = 256         # requests waiting for the model beyond which new ones get 503
    # the abstention rule's share answered (None: the model file's; core/model/abstain.py)
    coverage: float | None = None


class ModelService:
    """A loaded model file with its batcher, Grad-CAM lock and facts."""

    def __init__(self, loaded: LoadedModel, path: str | Path, options: ServeOptions = ServeOptions()) -> None:
        self.loaded, self.path, self.options = loaded, Path(path), options
        self.coverage = options.coverage
        self.class_names = loaded.class_names
        self.image_size = loaded.image_size
        self.has_box_head = box_head_of(loaded.model) is not None
        self.facts = {**model_facts(path, loaded.header), "backend": options.backend, "device": str(loaded.device)}
        self.onnx = None
        if options.backend == "onnx" and self.is_ensemble:
            raise UserError(f"{path}: an ensemble file; --backend onnx serves a single model (use --backend torch)")
        if options.backend == "onnx":
            from serve.onnx_backend import OnnxProbabilities

            self.onnx = OnnxProbabilities.export_and_check(loaded)
        self._explainer = copy.deepcopy(loaded.model).eval()
        self._explain_lock = threading.Lock()
        self.batcher = MicroBatcher(self._predict_batch, options.max_batch, options.max_wait_ms / 1000,
                                    max_queue=options.max_queue)

    @classmethod
    def load(cls, path: str | Path, options: ServeOptions = ServeOptions()) -> "ModelService":
        """Read a model file (UserError, naming it, when it cannot be read) and start the batcher."""
        return cls(load_for_inference(path, options.device), path, options)

    def close(self) -> None:
        self.batcher.close()

    @property
    def batcher_alive(self) -> bool:
        return self.batcher.alive

    def _predict_batch(self, images: np.ndarray, tta: bool, clinical: np.ndarray | None) -> CheckedBatch:
        """Probabilities, each image's checks (an ensemble's with its members' disagreement) and a box head's
        boxes, from one forward pass; the batcher hands each request its rows."""
        if self.onnx is not None and not tta and clinical is None:
            out = self.onnx.predict(images, self.loaded.temperature(False))
            classes = len(self.class_names)   # a box head's boxes are 4 more columns
            probs, boxes = out[:, :classes], (out[:, classes:] if out.shape[1] > classes else None)
            return CheckedBatch(probs, onnx_checks(self.loaded.header, probs, self.coverage), boxes)
        # a box head's boxes, same forward pass (an ensemble has no head of its own: none)
        with capture_boxes(self.loaded.model) as got:
            probs, checks = predict_checked(self.loaded, images, tta=tta, clinical=clinical, coverage=self.coverage)
        return CheckedBatch(probs, checks, view_boxes(got, tta))

    @property
    def is_ensemble(self) -> bool:
        """An ensemble file (core/model/ensemble.py): its answers carry the members' disagreement."""
        return isinstance(self.loaded, EnsembleModel)

    def encode(self, record: Mapping[str, Any] | None) -> np.ndarray | None:
        """The model's encoding of one validated record; None for an image-only model (fields ignored)."""
        if self.loaded.fusion is None or record is None:
            return None
        return self.loaded.encode([record])

    async def probabilities(self, images: np.ndarray, tta: bool = False,
                            clinical: np.ndarray | None = None) -> np.ndarray:
        """Calibrated probabilities [N, C] of uint8 images [N, 3, S, S], batched with concurrent requests."""
        return (await self.checked(images, tta, clinical)).probs

    async def checked(self, images: np.ndarray, tta: bool = False,
                      clinical: np.ndarray | None = None) -> CheckedBatch:
        """The probabilities and each image's checks (``ood``, ``abstain``: core/model/checked_prediction.py)."""
        return await asyncio.wrap_future(self.batcher.submit(images, tta, clinical))

    def verdicts(self, probs: np.ndarray, tta: bool) -> dict[str, Any]:
        return operating_verdicts(self.loaded.header.get("operating_points"), self.class_names, probs, tta)

    def temperature(self, tta: bool) -> float | None:
        return self.loaded.temperature(tta)

    def explain(self, image: np.ndarray, target: int, clinical: np.ndarray | None = None) -> dict[str, Any]:
        """Guided Grad-CAM of class ``target`` for one uint8 image [3,S,S] (with its encoded clinical fields [1, D], as
        predicted): heat map and overlay as base64 PNGs."""
        from core.explain.cam_boxes import cam_boxes, stored_fraction
        from core.explain.gradcam import DEFAULT_METHOD, CAPTUM_NAMES, choose_layer, gradcam_maps, overlay

        started = time.perf_counter()
        with self._explain_lock:
            heat = gradcam_maps(self._explainer, image[None], [target], self.loaded.device, method=DEFAULT_METHOD,
                                clinical=clinical)[0]
        return {"method": CAPTUM_NAMES[DEFAULT_METHOD], "box": cam_boxes(heat[None], stored_fraction(self.loaded.header))[0],
                "layer": choose_layer(self.image_size, DEFAULT_METHOD, self.loaded.arch),
                "target": self.class_names[target],
                "heatmap_png": _png_base64((np.clip(heat, 0, 1) * 255).astype(np.uint8)),
                "overlay_png": _png_base64(overlay(image, heat)), "ms": 1000 * (time.perf_counter() - started)}


# --- when not to trust the answer: each image's checks travel with its probabilities through the batcher -------

@dataclass(frozen=True)
class CheckedBatch:
    """Probabilities [N, C], each image's ``{"ood", "abstain"}`` (an ensemble's also ``"disagreement"``) and a box
    head's boxes [N, 4] as fractions (None without a head); sliced by the batcher per request."""

    probs: np.ndarray
    checks: list
    boxes: np.ndarray | None = None

    def __getitem__(self, rows: slice) -> "CheckedBatch":
        return CheckedBatch(self.probs[rows], self.checks[rows], None if self.boxes is None else self.boxes[rows])

    def __len__(self) -> int:
        return len(self.probs)


def onnx_checks(header: Mapping[str, Any], probs: np.ndarray, coverage: float | None) -> list[dict[str, Any]]:
    """ONNX Runtime gives probabilities only: no out-of-distribution score; the abstention rule still applies."""
    from core.model import abstain

    note = "not checked: --backend onnx gives probabilities only (serve with --backend torch for the check)"
    unknown = [{"score": None, "threshold": None, "in_distribution": None, "method": None, "note": note}
               for _ in range(len(probs))]
    decided = abstain.decide(header.get("abstention"), probs, "single", unknown, coverage)
    return [{"ood": o, "abstain": a} for o, a in zip(unknown, decided)]


def _png_base64(pixels: np.ndarray) -> str:
    """A base64 PNG of an [H,W] or [H,W,3] uint8 array, enlarged (nearest) to at least OVERLAY_MIN_SIDE."""
    from PIL import Image

    picture = Image.fromarray(pixels)
    factor = max(1, -(-OVERLAY_MIN_SIDE // max(1, min(picture.size))))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
