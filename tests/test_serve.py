"""The model server's routes with FastAPI's TestClient: schema, probabilities as core.predict gives them, calibration,
operating points, Grad-CAM, the KServe v2 routes, every kind of bad input, the API key and concurrent requests.

A random-init 32 px model written by the test (tests/serve_fixtures.py); no network, no training.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serving extras are not installed (pip install fastapi uvicorn ...)")
from fastapi.testclient import TestClient
from PIL import Image

from core.model.box_head import capture_boxes
from core.model.calibration import apply_temperature
from core.errors import run_cli
from core.data.image_cache import decode_image
from core.model.fields import validate_record
from serve.app import create_app
from serve.service import ModelService, ServeOptions
from tests.serve_fixtures import TEMPERATURE, bomb_png, image_bytes, write_model

SIZE = 32
NAME = "lesion-classifier"


@pytest.fixture(scope="module")
def model_file(module_tmp: Path) -> Path:
    return write_model(module_tmp / "final" / "model.pt", image_size=SIZE)


@pytest.fixture(scope="module")
def service(model_file: Path):
    service = ModelService.load(model_file, ServeOptions(device="cpu"))
    yield service
    service.close()


@pytest.fixture(scope="module")
def client(service: ModelService) -> TestClient:
    return TestClient(create_app(service, max_body=2 * 2**20))


def post_image(client: TestClient, data: bytes, name: str = "lesion.jpg", kind: str = "image/jpeg",
               **fields: str) -> httpx.Response:
    return client.post("/predict", files={"file": (name, data, kind)}, data=fields)


def test_health_ready_info_and_metrics(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "live"}
    assert client.get("/ready").json() == {"ready": True, "model": NAME}
    info = client.get("/info").json()
    assert info["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"] and info["image_size"] == SIZE
    assert info["calibration"]["temperature"]["single"] == TEMPERATURE and info["test"] is None
    assert "not a diagnosis" in info["warning"] and "back" in info["fields"]["site"]
    page = client.get("/")
    assert page.status_code == 200 and "research tool, not a diagnosis" in page.text and "<script" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN: works offline
    post_image(client, image_bytes())
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'lesion_serve_requests_total{method="POST",route="/predict",status="200"}' in metrics.text
    assert "lesion_serve_request_seconds_bucket" in metrics.text and "lesion_serve_batch_images_count" in metrics.text


def test_predict_matches_core_predict_with_calibration(client: TestClient, service: ModelService, model_file: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from core.predict import main as predict_main

    image = tmp_path / "lesion.jpg"
    image.write_bytes(image_bytes((70, 50), seed=3))
    body = post_image(client, image.read_bytes()).json()
    probs = np.array([body["probabilities"][c] for c in body["classes"]])
    assert abs(probs.sum() - 1) < 1e-6
    assert body["top_class"] == body["classes"][int(probs.argmax())] and body["top_probability"] == probs.max()
    predict_main([str(model_file), str(image), "--json", "--device", "cpu"])
    expected = json.loads(capsys.readouterr().out)[0]["probabilities"]
    assert np.allclose(probs, [expected[c] for c in body["classes"]], atol=1e-6)
    raw = service.loaded.predict(decode_image(image, SIZE)[None], calibrated=False)[0]
    assert np.allclose(probs, apply_temperature(raw[None], TEMPERATURE)[0], atol=1e-6)
    assert not np.allclose(probs, raw, atol=1e-4)  # the temperature (1.7) made a difference
    assert body["calibration"] == {"calibrated": True, "temperature": TEMPERATURE, "tta": False,
                                   "note": "calibrated: temperature 1.700 fitted on the validation split"}
    assert set(body["timing_ms"]) == {"decode", "predict", "total"} and "explain" not in body


def test_tta_uses_its_own_temperature(client: TestClient, service: ModelService) -> None:
    data = image_bytes(seed=4)
    body = post_image(client, data, tta="true").json()
    assert body["calibration"]["tta"] is True and body["calibration"]["temperature"] == pytest.approx(TEMPERATURE + 0.1)
    expected = service.loaded.predict(decode_image(io.BytesIO(data), SIZE)[None], tta=True)[0]
    assert np.allclose([body["probabilities"][c] for c in body["classes"]], expected, atol=1e-6)


def test_operating_point_verdicts_in_words(client: TestClient) -> None:
    body = post_image(client, image_bytes(seed=5)).json()
    verdicts = body["operating_points"]
    assert verdicts["positive_class"] == "mel" and verdicts["mode"] == "single/calibrated"
    assert verdicts["probability"] == body["probabilities"]["mel"]
    assert len(verdicts["points"]) == 6
    for point in verdicts["points"]:
        assert point["above"] == (verdicts["probability"] >= point["threshold"])
        wanted = "sensitivity" if point["kind"] == "specificity_at_sensitivity" else "specificity"
        assert point["text"].startswith(f"{'above' if point['above'] else 'below'} the threshold chosen for {wanted}")


def test_explain_returns_heat_map_and_overlay_pngs(client: TestClient) -> None:
    body = post_image(client, image_bytes(seed=6), explain="true").json()
    explain = body["explain"]
    assert explain["method"] == "GuidedGradCam" and explain["target"] == body["top_class"]
    heat = Image.open(io.BytesIO(base64.b64decode(explain["heatmap_png"])))
    over = Image.open(io.BytesIO(base64.b64decode(explain["overlay_png"])))
    assert heat.mode == "L" and over.mode == "RGB" and heat.size == over.size and min(over.size) >= 224


def test_clinical_fields_validated_and_ignored_by_an_image_only_model(client: TestClient) -> None:
    body = post_image(client, image_bytes(), age="45", sex="Female", site="lower extremity").json()
    assert body["metadata"]["given"] == {"age": 45.0, "sex": "female", "site": "lower extremity"}
    assert body["metadata"]["used"] is False and "ignored" in body["metadata"]["note"]
    assert "note" not in post_image(client, image_bytes(), sex="unknown").json()["metadata"]
    for field, value, words in (("age", "200", "out of range"), ("age", "old", "not a number"),
                                ("sex", "x", "not one of"), ("site", "../etc", "not one of")):
        answer = post_image(client, image_bytes(), **{field: value})
        assert answer.status_code == 422 and words in answer.json()["error"] and field in answer.json()["error"]



def test_a_model_with_clinical_fields_uses_the_fields_as_core_inference_does(module_tmp: Path, monkeypatch) -> None:
    import core.explain.gradcam

    path = write_model(module_tmp / "meta" / "model.pt", image_size=SIZE, metadata="concat", seed=1)
    service = ModelService.load(path, ServeOptions(device="cpu"))
    try:
        client = TestClient(create_app(service, max_body=2 * 2**20))
        data = image_bytes(seed=8)
        body = post_image(client, data, age="60", sex="male", site="back").json()
        assert body["metadata"]["used"] is True and "note" not in body["metadata"]
        record = {"age": 60.0, "sex": "male", "site": "back"}
        expected = service.loaded.predict(decode_image(io.BytesIO(data), SIZE)[None],
                                          clinical=service.loaded.encode([record]))[0]
        got = np.array([body["probabilities"][c] for c in body["classes"]])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        unknown = post_image(client, data).json()
        assert unknown["probabilities"] != body["probabilities"]  # the fields reach the model
        given, maps = [], core.explain.gradcam.gradcam_maps  # and Grad-CAM explains the model as it predicted, with them
        monkeypatch.setattr(core.explain.gradcam, "gradcam_maps", lambda *a, **k: given.append(k["clinical"]) or maps(*a, **k))
        explained = post_image(client, data, age="60", sex="male", site="back", explain="true").json()
        assert explained["explain"]["overlay_png"] and explained["explain"]["layer"] == "layer4"
        np.testing.assert_array_equal(given[0], service.loaded.encode([record]))
    finally:
        service.close()

def truncated_jpeg() -> bytes:
    data = image_bytes((120, 90), seed=7)
    return data[:len(data) // 2]


@pytest.mark.parametrize("data,name,kind,status,words", [
    (b"hello, not an image", "notes.jpg", "image/jpeg", 400, "notes.jpg: not an image"),
    (truncated_jpeg(), "cut.jpg", "image/jpeg", 400, "cut.jpg: cannot read image"),
    (bomb_png(), "bomb.png", "image/png", 413, "bomb.png: a decompression bomb"),
    (bomb_png(8000, 6000), "big.png", "image/png", 413, "big.png: 8000x6000 pixels is over the limit"),
    (b"", "empty.jpg", "image/jpeg", 400, "empty.jpg: empty file"),
    (image_bytes(), "lesion.jpg", "text/plain", 415, "'text/plain' is not an image"),
])
def test_bad_uploads_get_a_json_4xx_naming_the_problem(client: TestClient, caplog: pytest.LogCaptureFixture,
                                                       data: bytes, name: str, kind: str, status: int, words: str) -> None:
    with caplog.at_level(logging.WARNING):
        answer = post_image(client, data, name, kind)
    assert answer.status_code == status and words in answer.json()["error"], answer.text
    assert "Traceback" not in answer.text and "BytesIO" not in answer.text
    assert sum(words in r.getMessage() for r in caplog.records) == 1  # logged once
    assert post_image(client, image_bytes()).status_code == 200  # and the server keeps serving


def test_file_names_are_echoed_cleaned_never_used_as_paths(client: TestClient) -> None:
    assert post_image(client, image_bytes(), "../../etc/passwd").json()["image"] == "passwd"
    assert post_image(client, image_bytes(), "..\\..\\a\x1bb\x7f.jpg").json()["image"] == "a?b?.jpg"
    assert post_image(client, image_bytes(), "..").json()["image"] == "upload"


def test_wrong_request_content_type_and_missing_file(client: TestClient) -> None:
    answer = client.post("/predict", json={"file": "x"})
    assert answer.status_code == 415 and "multipart/form-data" in answer.json()["error"]
    answer = client.post("/predict", files={"other": ("a.jpg", image_bytes(), "image/jpeg")})
    assert answer.status_code == 422 and answer.json()["error"] == "file: Field required"
    assert client.get("/nowhere").json() == {"error": "Not Found"}


def test_a_body_over_the_cap_is_refused_declared_or_streamed(client: TestClient) -> None:
    big = b"\xff" * (3 * 2**20)  # the test app's cap is 2 MB
    answer = post_image(client, big, "big.jpg")
    assert answer.status_code == 413 and "over the limit of 2 MB" in answer.json()["error"]

    def chunks():  # no Content-Length: counted as it streams
        boundary = b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n" \
                   b"Content-Type: image/jpeg\r\n\r\n"
        yield boundary
        for _ in range(48):
            yield b"\0" * 2**16
        yield b"\r\n--x--\r\n"

    answer = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert answer.status_code == 413 and "over the limit" in answer.json()["error"]
    assert post_image(client, image_bytes()).status_code == 200


def test_a_50_mb_upload_to_the_real_server_is_413_and_it_keeps_serving(service: ModelService) -> None:
    from tests.serve_fixtures import running_server

    with running_server(create_app(service)) as url:  # uvicorn itself has no body limit: the app's
        answer = httpx.post(f"{url}/predict", files={"file": ("big.jpg", b"\xff" * (50 * 2**20), "image/jpeg")},
                            timeout=60)
        assert answer.status_code == 413 and answer.json() == {"error": "request body over the limit of 20 MB"}
        good = httpx.post(f"{url}/predict", files={"file": ("a.jpg", image_bytes(), "image/jpeg")}, timeout=60)
        assert good.status_code == 200


def test_an_unexpected_error_is_a_500_without_details_logged_once(service: ModelService,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    client = TestClient(create_app(service))

    def broken(*args: object) -> None:
        raise RuntimeError("secret internal state")

    monkeypatch.setattr(service, "explain", broken)
    with caplog.at_level(logging.ERROR):
        answer = post_image(client, image_bytes(), explain="true")
    assert answer.status_code == 500 and answer.json() == {"error": "internal error; the server's log has the details"}
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "secret internal state" in str(tracebacks[0].exc_info[1])
    assert post_image(client, image_bytes()).status_code == 200


def test_a_full_queue_is_a_503_with_retry_after(client: TestClient, service: ModelService,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.batcher import Busy

    def full(*args: object) -> None:
        raise Busy("256 requests are waiting for the model; try again shortly")

    monkeypatch.setattr(service.batcher, "submit", full)
    answer = post_image(client, image_bytes())
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.json() == {"error": "256 requests are waiting for the model; try again shortly"}


def test_api_key(service: ModelService) -> None:
    client = TestClient(create_app(service, api_key="s3cret"))
    for headers in ({}, {"X-API-Key": "wrong"}):
        answer = post_image_with(client, headers)
        assert answer.status_code == 401 and "X-API-Key" in answer.json()["error"]
    assert client.get("/info").status_code == 401 and client.get(f"/v2/models/{NAME}").status_code == 401
    assert post_image_with(client, {"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/").status_code == 200 and client.get("/health").status_code == 200  # the page asks for it
    assert client.get("/v2/health/ready").status_code == 200


def post_image_with(client: TestClient, headers: dict[str, str]) -> httpx.Response:
    return client.post("/predict", files={"file": ("a.jpg", image_bytes(), "image/jpeg")}, headers=headers)


def test_kserve_v2_metadata_and_infer(client: TestClient, service: ModelService) -> None:
    assert client.get("/v2").json()["name"] == "lesion-sweep"
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get(f"/v2/models/{NAME}").json()
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 3, SIZE, SIZE]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 7]}]
    assert meta["parameters"]["classes"][4] == "mel"
    assert client.get(f"/v2/models/{NAME}/ready").json() == {"name": NAME, "ready": True}
    images = np.stack([decode_image(io.BytesIO(image_bytes(seed=s)), SIZE) for s in (1, 2)])
    request = {"id": "r1", "inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                                       "data": images.ravel().tolist()}]}
    answer = client.post(f"/v2/models/{NAME}/infer", json=request).json()
    assert answer["id"] == "r1" and answer["model_name"] == NAME
    out = answer["outputs"][0]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [2, 7]
    probs = np.array(out["data"]).reshape(2, 7)
    assert np.allclose(probs, service.loaded.predict(images), atol=1e-6) and np.allclose(probs.sum(1), 1, atol=1e-5)
    nested = {"inputs": [{**request["inputs"][0], "data": images.tolist()}]}
    assert client.post(f"/v2/models/{NAME}/infer", json=nested).status_code == 200


@pytest.mark.parametrize("change,words", [
    ({"datatype": "FP32"}, "expected 'UINT8'"),
    ({"shape": [1, 3, 8, 8]}, "expected [N, 3, 32, 32]"),
    ({"data": [1, 2, 3]}, "3 values for shape"),
    ({"data": [300] * (3 * SIZE * SIZE)}, "outside 0..255"),
    ({"name": "pixels"}, "one input named 'image'"),
])
def test_kserve_v2_bad_tensors(client: TestClient, change: dict, words: str) -> None:
    tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 3, SIZE, SIZE], "data": [0] * (3 * SIZE * SIZE)}
    answer = client.post(f"/v2/models/{NAME}/infer", json={"inputs": [{**tensor, **change}]})
    assert answer.status_code == 400 and words in answer.json()["error"]


def test_kserve_v2_unknown_model_and_non_json(client: TestClient) -> None:
    answer = client.get("/v2/models/other")
    assert answer.status_code == 404 and "no model named 'other'" in answer.json()["error"]
    answer = client.post(f"/v2/models/{NAME}/infer", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "not JSON" in answer.json()["error"]


def test_twenty_parallel_requests_are_all_answered_and_batched(model_file: Path) -> None:
    service = ModelService.load(model_file, ServeOptions(device="cpu", max_wait_ms=50))
    app = create_app(service)
    datas = [image_bytes(seed=s) for s in range(20)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await asyncio.gather(*(http.post("/predict", files={"file": (f"{i}.jpg", d, "image/jpeg")})
                                          for i, d in enumerate(datas)))
    try:
        answers = asyncio.run(send_all())
        metrics = TestClient(app).get("/metrics").text
    finally:
        service.close()
    assert [a.status_code for a in answers] == [200] * 20
    expected = service.loaded.predict(np.stack([decode_image(io.BytesIO(d), SIZE) for d in datas]))
    got = np.array([[a.json()["probabilities"][c] for c in service.class_names] for a in answers])
    assert np.allclose(got, expected, atol=1e-6) and [a.json()["image"] for a in answers] == [f"{i}.jpg" for i in range(20)]
    passes = float(metrics.split("lesion_serve_batch_images_count ")[1].split()[0])
    images = float(metrics.split("lesion_serve_batch_images_sum ")[1].split()[0])
    assert images == 20 and 1 <= passes < 20  # some requests shared a forward pass


@pytest.mark.parametrize("content,words", [
    (None, "no such model file"),
    (b"PK\x03\x04 cut short", "damaged, not a readable PyTorch file"),
])
def test_start_up_with_a_bad_model_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               content: bytes | None, words: str) -> None:
    from serve.__main__ import main

    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(path), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and words in err and "\n" not in err


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (print, ("this pickle ran code",))


def test_start_up_refuses_a_pickle_that_would_run_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    from serve.__main__ import main

    path = tmp_path / "model.pt"
    torch.save({"format": "lesion-sweep/model", "payload": _RunsCode()}, path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(path), "--device", "cpu"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "this pickle ran code" not in captured.out
    assert captured.err.startswith("error: ") and "damaged, not a readable PyTorch file" in captured.err


def test_onnx_backend_gives_torchs_probabilities(model_file: Path, service: ModelService) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    onnx = ModelService.load(model_file, ServeOptions(device="cpu", backend="onnx"))
    try:
        client = TestClient(create_app(onnx))
        assert client.get("/info").json()["backend"] == "onnx"
        data = image_bytes(seed=9)
        expected = service.loaded.predict(decode_image(io.BytesIO(data), SIZE)[None])[0]
        body = post_image(client, data).json()
        assert np.allclose([body["probabilities"][c] for c in body["classes"]], expected, atol=1e-4)
        assert body["calibration"]["temperature"] == TEMPERATURE
        assert post_image(client, data, tta="true").json()["calibration"]["tta"] is True  # TTA: torch
    finally:
        onnx.close()


def test_onnx_backend_for_a_model_with_clinical_fields_answers_as_torch_with_and_without_fields(module_tmp: Path) -> None:
    """No fields: the ONNX graph (exported with every field unknown); fields: torch with them. Both as core does."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    path = write_model(module_tmp / "meta-onnx" / "model.pt", image_size=SIZE, metadata="concat", seed=2,
                       box_head=True)   # the box head's box comes through the ONNX graph too
    onnx = ModelService.load(path, ServeOptions(device="cpu", backend="onnx"))
    try:
        client, data, answers = TestClient(create_app(onnx)), image_bytes(seed=11), []
        image = decode_image(io.BytesIO(data), SIZE)[None]
        for fields in ({}, {"age": "70", "sex": "female", "site": "face"}):
            record = {"age": None, "sex": None, "site": None, **fields}
            encoded = onnx.loaded.encode([validate_record(record)]) if fields else None
            with capture_boxes(onnx.loaded.model) as boxes:
                expected = onnx.loaded.predict(image, clinical=encoded)[0]
            body = post_image(client, data, **fields).json()
            assert np.allclose([body["probabilities"][c] for c in body["classes"]], expected, atol=1e-4), fields
            assert np.allclose(body["box"]["fractions"], boxes[0][0].numpy(), atol=1e-4), fields
            answers.append(body["probabilities"])
        assert answers[0] != answers[1]  # the fields reached the model
    finally:
        onnx.close()


def test_model_facts_read_metrics_json_beside_the_model(model_file: Path, tmp_path: Path) -> None:
    import shutil

    from core.evaluation.evaluation_file import SourceData, SweepMetric, TrainingRecord
    from serve.facts import model_facts

    copy = tmp_path / "model.pt"
    shutil.copy(model_file, copy)
    data = SourceData("/data/HAM10000", "ham10000", "0" * 64, ("a", "b"))
    training = TrainingRecord("/r/s/best.json", "t1", SweepMetric("val_loss", 0.9, "min"), 12, 12, ("train",),
                              {"train": 7000, "val": 1500, "test": 1500}, 9, "val_loss", 12, {}, "cpu", 60.0)
    (tmp_path / "metrics.json").write_text(json.dumps({
        "source": {"split": "test", "data": data.to_dict()}, "training": training.to_dict(),
        "test_balanced_accuracy": 0.496, "test_accuracy": 0.7, "test_auc": 0.88, "n_images": 1500,
        "intervals": {"test_balanced_accuracy": [0.44, 0.55]}}))
    meta = {"class_names": ["a", "b"], "image_size": 64, "config": {"epochs": 12}, "epoch": 9}
    facts = model_facts(copy, meta)
    assert facts["test"]["balanced_accuracy"] == 0.496 and facts["test"]["balanced_accuracy_ci"] == [0.44, 0.55]
    assert facts["test"]["data"] == {"name": "HAM10000", "layout": "ham10000", "classes": 2}  # no server path
    assert facts["test"]["split_sizes"]["test"] == 1500 and facts["test"]["epochs_run"] == 12
    assert facts["calibration"] == {"skipped": "the model file holds no temperature"} and facts["arch"] == "resnet18"
    (tmp_path / "metrics.json").write_text("{cut sh")
    assert model_facts(copy, meta)["test"] is None  # a damaged metrics.json: no figures, still serving


def test_verdicts_say_why_when_there_are_none() -> None:
    from serve.verdicts import operating_verdicts

    classes = ("mel", "nv")
    assert operating_verdicts(None, classes, [0.3, 0.7], False) == {
        "skipped": "the model file holds no operating points"}
    reason = "trained on train+val, so no split is held out"
    assert operating_verdicts({"skipped": reason}, classes, [0.3, 0.7], False) == {"skipped": reason}
    only_single = {"positive_class": "mel", "modes": {"single/calibrated": {"points": []}}}
    assert "tta/calibrated" in operating_verdicts(only_single, classes, [0.3, 0.7], True)["skipped"]


def test_batcher_groups_queued_jobs_and_survives_a_failing_batch() -> None:
    import threading

    from serve.batcher import Busy, MicroBatcher

    calls: list[tuple[int, bool]] = []
    entered, release = threading.Event(), threading.Event()

    def predict(images: np.ndarray, tta: bool, clinical: object) -> np.ndarray:
        entered.set()
        release.wait(10)
        calls.append((len(images), tta))
        if images[0, 0, 0, 0] == 99:
            raise ValueError("bad batch")
        return np.repeat(images[:, :1, 0, 0].astype(float), 2, axis=1)

    batcher = MicroBatcher(predict, max_batch=8, max_queue=3)
    try:
        first = batcher.submit(np.full((1, 1, 1, 1), 1))
        assert entered.wait(10)  # the first runs alone, held until release
        queued = [batcher.submit(np.full((1, 1, 1, 1), v), tta=v == 4) for v in (2, 3, 4)]
        with pytest.raises(Busy, match="3 requests are waiting"):  # the queue is full: refused, not piled up
            batcher.submit(np.full((1, 1, 1, 1), 7))
        release.set()
        assert first.result(10).tolist() == [[1.0, 1.0]]
        assert [f.result(10)[0, 0] for f in queued] == [2.0, 3.0, 4.0]
        assert calls == [(1, False), (2, False), (1, True)]  # the queued ones: one batch per TTA flag
        with pytest.raises(ValueError, match="bad batch"):
            batcher.submit(np.full((1, 1, 1, 1), 99)).result(10)
        assert batcher.submit(np.full((1, 1, 1, 1), 5)).result(10).tolist() == [[5.0, 5.0]] and batcher.alive
    finally:
        batcher.close()


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(buffer, format="PNG")
    return buffer.getvalue()


def test_answers_say_whether_the_image_is_like_the_training_images_and_whether_to_answer(
        client: TestClient, service: ModelService) -> None:
    from tests.serve_fixtures import lesion_like

    like = lesion_like(1, SIZE, seed=99)[0]   # one of the images the fixture's statistics were fitted on
    body = post_image(client, _png(like), name="lesion.png", kind="image/png").json()
    stored = service.loaded.header["ood"]
    assert body["ood"] == {**body["ood"], "in_distribution": True, "method": "mahalanobis",
                           "threshold": pytest.approx(stored["thresholds"]["mahalanobis"])}
    assert body["ood"]["score"] <= body["ood"]["threshold"]
    assert set(body["abstain"]) >= {"abstained", "reason"} and body["abstain"]["reason"] in (None, "low_confidence")
    flat = np.zeros((3, SIZE, SIZE), np.uint8) + np.array([30, 60, 200], np.uint8)[:, None, None]  # a blue square
    body = post_image(client, _png(flat), name="blue.png", kind="image/png").json()
    assert body["ood"]["in_distribution"] is False and body["ood"]["score"] > body["ood"]["threshold"]
    assert body["abstain"]["abstained"] is True and body["abstain"]["reason"] == "out_of_distribution"
    images = np.stack([like, flat])
    answer = client.post(f"/v2/models/{NAME}/infer", json={"inputs": [{
        "name": "image", "datatype": "UINT8", "shape": list(images.shape), "data": images.ravel().tolist()}]}).json()
    assert [o["in_distribution"] for o in answer["parameters"]["ood"]] == [True, False]
    assert [a["reason"] for a in answer["parameters"]["abstain"]][1] == "out_of_distribution"
