"""``--backend onnx``: single-view probabilities from ONNX Runtime (CPU), exported from the loaded model at start-up.

torch.onnx.export(dynamo=True) (torch's current exporter) exports normalisation, network and softmax as one
graph taking the uint8 images [N, 3, S, S] (N free); the stored temperature is applied after, as
core.model.inference does. At start-up its probabilities are compared with torch's on a few random images and a
difference over 1e-4 refuses to start. TTA and Grad-CAM stay on torch.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import numpy as np
import torch
from torch import nn

from core.model.forward import IMAGENET_MEAN, IMAGENET_STD
from core.model.box_head import capture_boxes, view_boxes
from core.model.calibration import apply_temperature
from core.errors import UserError
from core.model.inference import LoadedModel

log = logging.getLogger(__name__)

TOLERANCE = 1e-4


class _Probabilities(nn.Module):
    """uint8 images -> softmax probabilities, normalised as core.training.augment.normalize does. Its constants are this
    module's buffers: normalize's are cached per device, and exporting through it would cache a fake tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("scale", torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with capture_boxes(self.model) as got:   # a box head's boxes join the graph as 4 more columns
            probs = torch.softmax(self.model(torch.addcmul(self.shift, images.float(), self.scale)), 1)
        return torch.cat([probs, got[0]], 1) if got else probs


class OnnxProbabilities:
    """An ONNX Runtime session giving the probabilities of uint8 images [N, 3, S, S]."""

    def __init__(self, session: object, classes: int | None = None) -> None:
        self.session = session
        self.classes = classes   # the probabilities' columns (the rest: a box head's box)

    @classmethod
    def export_and_check(cls, loaded: LoadedModel, check_images: int = 4) -> "OnnxProbabilities":
        import onnxruntime

        started = time.perf_counter()
        size = loaded.image_size
        model = _Probabilities(loaded.model).to("cpu").eval()
        example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
        batch = torch.export.Dim("batch", min=1, max=4096)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")   # the exporter's notes on its own internals
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"],
                                        output_names=["probabilities"], dynamic_shapes={"images": {0: batch}},
                                        verbose=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        # no busy-waiting between runs: its spinning threads would take the CPU from torch (Grad-CAM, TTA)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        backend = cls(session, len(loaded.class_names))
        loaded.model.to(loaded.device)  # the export ran on the CPU
        backend.check(loaded, size, check_images)
        log.info("ONNX Runtime backend ready in %.1f s (probabilities within %g of torch's)",
                 time.perf_counter() - started, TOLERANCE)
        return backend

    def check(self, loaded: object, size: int, n: int) -> None:
        """Refuse to serve (UserError) where ONNX Runtime's probabilities differ from torch's by over TOLERANCE."""
        images = np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8)
        ours = self.predict(images, None)
        with capture_boxes(loaded.model) as got:
            theirs = loaded.predict(images, calibrated=False)
        if got:
            theirs = np.concatenate([theirs, view_boxes(got)], 1)
        worst = float(np.abs(ours - theirs).max())
        if worst > TOLERANCE:
            raise UserError(f"--backend onnx: ONNX Runtime's probabilities differ from torch's by {worst:.2g} "
                            f"(over {TOLERANCE:g}); serve with --backend torch")

    def predict(self, images_uint8: np.ndarray, temperature: float | None) -> np.ndarray:
        """Probabilities [N, C] (a model with a box head: its boxes as 4 more columns, which no temperature touches)."""
        probs = self.session.run(None, {"images": np.ascontiguousarray(images_uint8)})[0].astype(np.float64)   # type: ignore[attr-defined]
        if temperature is None:
            return probs
        classes = self.classes or probs.shape[1]
        return np.concatenate([apply_temperature(probs[:, :classes], temperature), probs[:, classes:]], 1)
