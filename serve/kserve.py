"""The Open Inference Protocol (KServe v2) routes, for programs: health, model metadata and tensor inference.

    GET  /v2                          server metadata
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/<name>            inputs, outputs, classes
    GET  /v2/models/<name>/ready
    POST /v2/models/<name>/infer      {"inputs": [{"name": "image", "datatype": "UINT8",
                                        "shape": [N, 3, S, S], "data": [...]}], "parameters": {"tta": false}}
                                      -> {"outputs": [{"name": "probabilities", "datatype": "FP32",
                                          "shape": [N, C], "data": [...]}], "parameters": {"classes": [...],
                                          "ood": [{"score", "threshold", "in_distribution", ...} per image],
                                          "abstain": [{"abstained", "reason", ...} per image]}}

A model trained with the box head (config key ``box_loss_weight``) adds the outputs ``box_pixels`` (x0, y0, x1, y1
in pixels of the S x S input) and ``box_fractions`` (the same as fractions of its sides), FP32 [N, 4].

The image tensor is what the model takes: RGB uint8, channels first, already S x S (decode and resize
as core.data.image_cache.decode_image does); ``data`` flat (row-major) or nested. Probabilities are calibrated
as on /predict.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from serve.uploads import BadInput

INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
BOX_OUTPUTS = ("box_pixels", "box_fractions")   # a model with a box head: x0, y0, x1, y1 per image
MAX_INFER_IMAGES = 64


def kserve_router() -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])

    @router.get("")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "lesion-sweep", "version": "1", "extensions": []}

    @router.get("/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready")
    async def ready(request: Request) -> dict[str, bool]:
        return {"ready": request.app.state.service.batcher_alive}

    @router.get("/models/{name}")
    async def model_metadata(name: str, request: Request) -> dict[str, Any]:
        service = _service(request, name)
        size, classes = service.image_size, list(service.class_names)
        return {"name": name, "versions": ["1"], "platform": f"pytorch_{service.options.backend}",
                "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, 3, size, size]}],
                "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(classes)]},
                            *({"name": box, "datatype": "FP32", "shape": [-1, 4]} for box in BOX_OUTPUTS
                              if service.has_box_head)],
                "parameters": {"classes": classes, "calibrated": service.temperature(False) is not None,
                               "facts": service.facts}}

    @router.get("/models/{name}/ready")
    async def model_ready(name: str, request: Request) -> dict[str, Any]:
        return {"name": name, "ready": _service(request, name).batcher_alive}

    @router.post("/models/{name}/infer")
    async def infer(name: str, request: Request) -> dict[str, Any]:
        service = _service(request, name)
        try:
            body = await request.json()
        except ValueError:
            raise BadInput(400, "the body is not JSON (send an Open Inference Protocol request)") from None
        images, tta = parse_infer(body, service.image_size)
        checked = await service.checked(images, tta)
        probs, boxes = checked.probs, checked.boxes
        response = {"model_name": name, "model_version": "1",
                    "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(probs.shape),
                                 "data": probs.astype(np.float32).ravel().tolist()},
                                *box_outputs(boxes, service.image_size)],
                    "parameters": {"classes": list(service.class_names), "tta": tta,
                                   "temperature": service.temperature(tta),
                                   # per image, as on /predict (core/model/checked_prediction.py)
                                   "ood": [c["ood"] for c in checked.checks],
                                   "abstain": [c["abstain"] for c in checked.checks]}}
        if isinstance(body.get("id"), str):
            response["id"] = body["id"]
        return response

    return router


# --- the box head's lesion box (core/model/box_head.py): a model trained with one answers it beside the probabilities ---
def box_outputs(boxes: np.ndarray | None, size: int) -> list[dict[str, Any]]:
    """The boxes [N, 4] (x0, y0, x1, y1) in pixels of the S x S input tensor and in fractions of its sides; none
    without a box head."""
    if boxes is None:
        return []
    fractions = np.asarray(boxes, dtype=np.float32)
    return [{"name": name, "datatype": "FP32", "shape": list(fractions.shape), "data": values.ravel().tolist()}
            for name, values in zip(BOX_OUTPUTS, (fractions * size, fractions))]


def _service(request: Request, name: str) -> Any:
    if name != request.app.state.model_name:
        raise BadInput(404, f"no model named {name[:80]!r}; this server has {request.app.state.model_name!r}")
    return request.app.state.service


def parse_infer(body: object, size: int) -> tuple[np.ndarray, bool]:
    """(uint8 images [N,3,S,S], tta) of an inference request; BadInput naming what does not fit."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise BadInput(400, "the request has no 'inputs' list")
    found = [t for t in body["inputs"] if isinstance(t, dict) and t.get("name") == INPUT_NAME]
    if len(found) != 1:
        raise BadInput(400, f"expected one input named {INPUT_NAME!r}")
    tensor = found[0]
    if tensor.get("datatype") != "UINT8":
        raise BadInput(400, f"input {INPUT_NAME!r}: datatype {tensor.get('datatype')!r}, expected 'UINT8'")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) for d in shape)
            and shape[1:] == [3, size, size] and 1 <= shape[0] <= MAX_INFER_IMAGES):
        raise BadInput(400, f"input {INPUT_NAME!r}: shape {str(shape)[:60]}, expected [N, 3, {size}, {size}] "
                            f"with 1 <= N <= {MAX_INFER_IMAGES}")
    try:
        data = np.asarray(tensor.get("data"), dtype=np.int64).ravel()
    except (TypeError, ValueError):
        raise BadInput(400, f"input {INPUT_NAME!r}: data is not a list of integers") from None
    if data.size != int(np.prod(shape)):
        raise BadInput(400, f"input {INPUT_NAME!r}: {data.size} values for shape {shape}")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise BadInput(400, f"input {INPUT_NAME!r}: values outside 0..255")
    tta = (body.get("parameters") or {}).get("tta", False)
    if not isinstance(tta, bool):
        raise BadInput(400, "parameters.tta: expected true or false")
    return data.astype(np.uint8).reshape(shape), tta
