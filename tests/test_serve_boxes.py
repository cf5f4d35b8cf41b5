"""The served lesion box: /predict (the box head's, else Grad-CAM's with explain), KServe's box outputs, against core's own
boxes (the ONNX backend's: tests/test_serve.py). Random-init 32 px models (tests/serve_fixtures.py); no training."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serving extras are not installed (pip install fastapi uvicorn ...)")
from fastapi.testclient import TestClient

from core.model.box_head import capture_boxes, view_boxes
from core.data.image_cache import decode_image
from serve.app import create_app
from serve.service import ModelService, ServeOptions
from tests.serve_fixtures import image_bytes, write_model

SIZE = 32
NAME = "lesion-classifier"


@pytest.fixture(scope="module")
def model_file(module_tmp: Path) -> Path:
    return write_model(module_tmp / "model.pt", image_size=SIZE, box_head=True)


@pytest.fixture(scope="module")
def service(model_file: Path):
    service = ModelService.load(model_file, ServeOptions(device="cpu"))
    yield service
    service.close()


def core_box(service: ModelService, data: bytes) -> np.ndarray:
    with capture_boxes(service.loaded.model) as got:
        service.loaded.predict(decode_image(io.BytesIO(data), SIZE)[None])
    return view_boxes(got)[0]


def test_predict_answers_the_head_box_in_pixels_of_the_upload(service: ModelService) -> None:
    client = TestClient(create_app(service))
    data = image_bytes((60, 45), seed=4)
    body = client.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")}, data={"explain": "true"}).json()
    box, expected = body["box"], core_box(service, data)
    assert box["source"] == "box head" and box["image_size"] == [60, 45]
    assert np.allclose(box["fractions"], expected, atol=1e-4)
    assert np.allclose(box["pixels"], expected * [60, 45, 60, 45], atol=0.06)
    assert body["explain"]["box"]["source"] == "Grad-CAM"          # the map's box beside it
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-5)   # the boxes are not probabilities
    tta = client.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")}, data={"tta": "true"}).json()
    assert np.allclose(tta["box"]["fractions"], expected, atol=1e-4)  # the image as given, not a turned view


def test_a_model_without_the_head_boxes_only_with_grad_cam(module_tmp: Path) -> None:
    plain = ModelService.load(write_model(module_tmp / "plain.pt", image_size=SIZE), ServeOptions(device="cpu"))
    try:
        client = TestClient(create_app(plain))
        data = image_bytes((60, 45), seed=5)
        assert client.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")}).json()["box"] is None
        body = client.post("/predict", files={"file": ("a.jpg", data, "image/jpeg")}, data={"explain": "true"}).json()
        assert body["box"]["source"] == "Grad-CAM" and body["box"] == body["explain"]["box"]
        meta = client.get(f"/v2/models/{NAME}").json()
        assert [out["name"] for out in meta["outputs"]] == ["probabilities"]
    finally:
        plain.close()


def test_kserve_answers_the_boxes(service: ModelService) -> None:
    client = TestClient(create_app(service))
    meta = client.get(f"/v2/models/{NAME}").json()
    assert [out["name"] for out in meta["outputs"]] == ["probabilities", "box_pixels", "box_fractions"]
    images = np.stack([decode_image(io.BytesIO(image_bytes(seed=s)), SIZE) for s in (1, 2)])
    request = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                           "data": images.ravel().tolist()}]}
    outputs = {out["name"]: out for out in client.post(f"/v2/models/{NAME}/infer", json=request).json()["outputs"]}
    with capture_boxes(service.loaded.model) as got:
        service.loaded.predict(images)
    fractions = np.array(outputs["box_fractions"]["data"]).reshape(outputs["box_fractions"]["shape"])
    assert fractions.shape == (2, 4) and np.allclose(fractions, view_boxes(got), atol=1e-5)
    assert np.allclose(np.array(outputs["box_pixels"]["data"]).reshape(2, 4), fractions * SIZE, atol=1e-4)
    assert outputs["probabilities"]["shape"] == [2, 7]
