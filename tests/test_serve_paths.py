"""No answer of the server holds its own paths: every route, good and bad requests, for a model whose files
record them (metrics.json's data folder, a weights file in its config).

    python -m pytest -q tests/test_serve_paths.py
"""

from __future__ import annotations

import io
import json

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from core.data.image_cache import decode_image
from serve.app import create_app
from serve.service import ModelService, ServeOptions
from tests.serve_fixtures import image_bytes, write_model

SIZE = 32
NAME = "lesion-classifier"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(client, the paths it must never show, its app) for a model trained on a data folder with a weights file."""
    root = tmp_path_factory.mktemp("secret-place").resolve()
    data, weights = root / "data" / "ham10000-200x150", root / "weights" / "start.pt"
    model = write_model(root / "final" / "model.pt", image_size=SIZE, pretrained=str(weights))
    (model.parent / "metrics.json").write_text(json.dumps({
        "source": {"split": "test", "model": str(model),
                   "data": {"path": str(data), "layout": "ham10000", "fingerprint": "0" * 64,
                            "class_names": list("abcdefg")}},
        "training": {"best_json": str(root / "best.json"), "trial_id": "t1",
                     "sweep_metric": {"name": "val_loss", "value": 0.9, "mode": "min"}, "tuned_epochs": 2,
                     "epochs": 2, "train_splits": ["train"], "split_sizes": {"train": 70, "val": 15, "test": 15},
                     "chosen_epoch": 2, "chosen_by": "val_loss", "epochs_run": 2, "chosen_epoch_metrics": {},
                     "device": "cpu", "wall_s": 1.0},
        "test_balanced_accuracy": 0.4, "n_images": 15, "intervals": {"test_balanced_accuracy": [0.3, 0.5]}}))
    service = ModelService.load(model, ServeOptions(device="cpu"))
    app = create_app(service, max_body=2**20)
    yield TestClient(app), [str(root), str(model), str(data), str(weights)], app
    service.close()


def test_no_answer_of_any_route_holds_a_server_path(served) -> None:
    client, paths, app = served
    image = decode_image(io.BytesIO(image_bytes()), SIZE)
    tensor = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, SIZE, SIZE],
                          "data": image.ravel().tolist()}]}
    upload = {"file": ("lesion.jpg", image_bytes(), "image/jpeg")}
    answers = {
        "GET /": client.get("/"), "GET /info": client.get("/info"), "GET /health": client.get("/health"),
        "GET /ready": client.get("/ready"),
        "POST /predict": client.post("/predict", files=upload, data={"explain": "true", "tta": "true"}),
        "POST /predict bad image": client.post("/predict", files={"file": ("x.jpg", b"not an image", "image/jpeg")}),
        "POST /predict bad field": client.post("/predict", files=upload, data={"age": "-3"}),
        "POST /predict no file": client.post("/predict", json={}),
        "POST /predict too large": client.post("/predict", files={"file": ("a.jpg", b"\xff" * 2**21, "image/jpeg")}),
        "GET /v2": client.get("/v2"), "GET /v2/health/live": client.get("/v2/health/live"),
        "GET /v2/health/ready": client.get("/v2/health/ready"),
        "GET /v2/models/{name}": client.get(f"/v2/models/{NAME}"),
        "GET /v2/models/{name} unknown": client.get("/v2/models/other"),
        "GET /v2/models/{name}/ready": client.get(f"/v2/models/{NAME}/ready"),
        "POST /v2/models/{name}/infer": client.post(f"/v2/models/{NAME}/infer", json=tensor),
        "POST /v2/models/{name}/infer bad": client.post(f"/v2/models/{NAME}/infer", content=b"{"),
        "GET /nowhere": client.get("/nowhere"), "GET /openapi.json": client.get("/openapi.json"),
        "GET /docs": client.get("/docs"),
    }
    answers["GET /metrics"] = client.get("/metrics")  # last: it names every route requested above
    for key, answer in answers.items():
        text = answer.text + json.dumps(dict(answer.headers))
        assert not [p for p in paths if p in text], f"{key} shows a server path: {text[:300]}"
    assert answers["POST /predict"].status_code == 200 and answers["GET /info"].json()["test"]["data"] == {
        "name": "ham10000-200x150", "layout": "ham10000", "classes": 7}
    assert "start.pt" in answers["GET /info"].json()["pretrained"]
    assert {a.status_code for a in answers.values()} >= {200, 400, 404, 413, 415, 422}
    # Every route of the app was asked (a route added later must be added here).
    routes = {f"{method} {route.path}" for route in app.routes if isinstance(route, APIRoute)
              for method in route.methods}
    assert routes <= {key.split(" ")[0] + " " + key.split(" ")[1] for key in answers}, routes
