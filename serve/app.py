"""The FastAPI app: the page, /predict, health, the Open Inference Protocol (KServe v2) routes and /metrics.

:func:`create_app` builds it around a loaded :class:`serve.service.ModelService`; uvicorn runs it
(``python -m serve``) and so does Ray Serve (``--ray``: serve/ray_app.py builds the same app on each
replica). Every error answer is JSON ``{"error": "..."}`` naming the problem (serve/guard.py for what
no route handles).
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from core.errors import UserError
from core.data.lesion_boxes import box_answer, upright_size
from serve.batcher import Busy
from core.model.fields import AGE_RANGE, SEXES, SITES, validate_record
from serve.guard import Guard
from serve.kserve import kserve_router
from serve.metrics import ServeMetrics
from serve.service import ModelService
from serve.uploads import BadInput, check_part_type, decode_upload, display_name

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 20 * 2**20   # an upload of a dermoscopic image is a few MB at most
DEFAULT_MODEL_NAME = "lesion-classifier"
WARNING = ("A research tool, not a diagnosis: the probabilities come from a model trained on one dataset and "
           "say nothing certain about a patient. See a doctor about any skin lesion that worries you.")
PAGE = Path(__file__).with_name("page.html")


def create_app(service: ModelService, *, api_key: str | None = None, model_name: str = DEFAULT_MODEL_NAME,
               max_body: int = MAX_BODY_BYTES, metrics: ServeMetrics | None = None) -> FastAPI:
    """The app serving ``service``; ``api_key``: required in X-API-Key on every route but the page and health."""
    metrics = metrics or ServeMetrics()
    app = FastAPI(title="lesion-sweep model server", version="1",
                  description="Calibrated class probabilities, operating-point verdicts and Grad-CAM of a "
                              "lesion-sweep model. " + WARNING)
    app.state.service, app.state.metrics, app.state.model_name = service, metrics, model_name
    service.batcher.on_batch(metrics.batch.observe)
    app.state.api_key_required = api_key is not None
    _add_error_handlers(app)
    _add_routes(app)
    app.include_router(kserve_router())
    app.add_middleware(Guard, metrics=metrics, max_body=max_body, api_key=api_key)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        log.warning("%s %s: 503 %s", request.method, request.url.path, exc)
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput) -> JSONResponse:
        log.warning("%s %s: %d %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if request.url.path == "/predict" and kind != "multipart/form-data":
            message, status = (f"content type {kind or 'none'!r}: send multipart/form-data with the image in the "
                               f"'file' field"), 415
        else:
            message, status = "; ".join(_describe(e) for e in exc.errors()), 422
        log.warning("%s %s: %d %s", request.method, request.url.path, status, message)
        return JSONResponse({"error": message}, status_code=status)


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
    return f"{where}: {error.get('msg', 'invalid')}"


def _add_routes(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        service: ModelService = request.app.state.service
        ok = service.batcher_alive
        return JSONResponse({"ready": ok, "model": request.app.state.model_name}, status_code=200 if ok else 503)

    @app.get("/info")
    async def info(request: Request) -> dict[str, Any]:
        """The model's facts (the page's panel): classes, training, calibration, test figures."""
        return {**request.app.state.service.facts, "name": request.app.state.model_name, "warning": WARNING,
                "fields": {"sex": list(SEXES), "site": list(SITES), "age": list(AGE_RANGE)}}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route(request: Request) -> Response:
        body, kind = request.app.state.metrics.render()
        return Response(body, media_type=kind)

    @app.post("/predict")
    async def predict(request: Request, file: UploadFile = File(..., description="a dermoscopic image"),
                      tta: bool = Form(False), explain: bool = Form(False), age: str | None = Form(None),
                      sex: str | None = Form(None), site: str | None = Form(None)) -> dict[str, Any]:
        """Calibrated class probabilities, operating-point verdicts, whether the image looks like the training
        images ("ood") and whether the model answers ("abstain"), and (explain=true) Guided Grad-CAM of one image."""
        started = time.perf_counter()
        service: ModelService = request.app.state.service
        name = display_name(file.filename)
        check_part_type(file.content_type, name)
        record = _record(age, sex, site)
        data = await file.read()
        image = await run_in_threadpool(decode_upload, data, name, service.image_size)
        decoded = time.perf_counter()
        encoded = service.encode(record)
        checked = await service.checked(image[None], tta, encoded)
        probs, boxes = checked.probs[0], checked.boxes
        predicted = time.perf_counter()
        body = prediction_body(service, probs, tta, name, record)
        # "ood", "abstain" and an ensemble's members' "disagreement" (core/model/checked_prediction.py)
        body.update(checked.checks[0])
        if explain:
            body["explain"] = await run_in_threadpool(service.explain, image, int(probs.argmax()), encoded)
        body.update(lesion_box(data, None if boxes is None else boxes[0], body.get("explain")))
        body["timing_ms"] = {"decode": 1000 * (decoded - started), "predict": 1000 * (predicted - decoded),
                             "total": 1000 * (time.perf_counter() - started)}
        return body


# --- the lesion box (core/model/box_head.py, core/explain/cam_boxes.py): in pixels of the uploaded image and in fractions ---
def lesion_box(data: bytes, head: np.ndarray | None, explain: dict[str, Any] | None) -> dict[str, Any]:
    """/predict's ``box``: the box head's, else (with explain) the Grad-CAM map's, else null; the Grad-CAM box also
    in ``explain.box``. The upload decoded already, so its size is readable."""
    width, height = upright_size(io.BytesIO(data))
    cam = None
    if explain is not None:
        explain["box"] = cam = box_answer(explain["box"], width, height, "Grad-CAM")
    return {"box": box_answer(head, width, height, "box head") if head is not None else cam}


def _record(age: str | None, sex: str | None, site: str | None) -> dict[str, Any]:
    try:
        return validate_record({"age": age, "sex": sex, "site": site})
    except UserError as exc:
        raise BadInput(422, str(exc)) from None


def prediction_body(service: ModelService, probs: np.ndarray, tta: bool, name: str,
                    record: dict[str, Any]) -> dict[str, Any]:
    """/predict's answer for one image's calibrated probabilities."""
    top = int(probs.argmax())
    temperature = service.temperature(tta)
    given = {k: v for k, v in record.items() if v is not None}
    return {
        "image": name, "classes": list(service.class_names),
        "probabilities": {c: float(p) for c, p in zip(service.class_names, probs)},
        "top_class": service.class_names[top], "top_probability": float(probs[top]),
        "calibration": {"calibrated": temperature is not None, "temperature": temperature, "tta": tta,
                        "note": (f"calibrated: temperature {temperature:.3f} fitted on the validation split"
                                 if temperature is not None else "not calibrated: the model file holds no temperature")},
        "operating_points": service.verdicts(probs, tta),
        "metadata": {"given": given, "used": service.loaded.fusion is not None and bool(given),
                     **({} if service.loaded.fusion is not None or not given else
                        {"note": "this model was trained on images only: age, sex and site are ignored"})},
        "warning": WARNING,
    }
