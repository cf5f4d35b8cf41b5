"""The served page in a real browser: headless Chromium uploads an image, the bars, the Grad-CAM overlay and the
lesion box appear, and no script error happens. Skipped, with the reason, where no Chromium is installed (Debian: ``apt-get install
chromium``; .ci/run installs it when it runs as root). Driven over the DevTools protocol (tests/chromium_cdp.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serving extras are not installed (pip install fastapi uvicorn ...)")

from serve.app import create_app
from serve.service import ModelService, ServeOptions
from tests.chromium_cdp import Browser, find_chromium
from tests.serve_fixtures import image_bytes, running_server, write_model

BROWSER = find_chromium()
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(module_tmp: Path):
    service = ModelService.load(write_model(module_tmp / "model.pt", image_size=48, box_head=True),
                                ServeOptions(device="cpu"))
    try:
        with running_server(create_app(service, api_key="k3y")) as url:
            yield url
    finally:
        service.close()


def test_upload_shows_bars_verdicts_and_overlay_without_script_errors(server: str, tmp_path: Path) -> None:
    image = tmp_path / "lesion.jpg"
    image.write_bytes(image_bytes((200, 150), seed=1))
    with Browser(BROWSER) as browser:
        browser.call("Page.addScriptToEvaluateOnNewDocument",   # the key the page asks for once
                     source="window.prompt = () => { window.asked = (window.asked || 0) + 1; return 'k3y'; };")
        browser.open(server + "/")
        browser.wait_for("document.body.dataset.ready")
        assert browser.evaluate("window.asked") == 1  # /info needed the key
        assert "akiec" in browser.evaluate("document.getElementById('facts').textContent")
        browser.pick_file("#file", image)
        state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
        assert state == "done", browser.evaluate("document.getElementById('error').textContent")
        assert browser.evaluate("document.querySelectorAll('#bars .bar').length") == 7
        assert browser.wait_for("document.getElementById('overlay').complete && "
                                "document.getElementById('overlay').naturalWidth") >= 224
        assert browser.evaluate("document.getElementById('preview').naturalWidth") == 200
        # the box head's lesion box, drawn over the image where the answer puts it (fractions of its sides)
        box = browser.evaluate("(() => { const b = document.getElementById('box'), i = document.getElementById("
                               "'preview'); const r = b.getBoundingClientRect(), p = i.getBoundingClientRect(); "
                               "return {hidden: b.hidden, source: b.dataset.source, left: (r.left - p.left) / p.width, "
                               "width: r.width / p.width, top: (r.top - p.top) / p.height}; })()")
        assert box["hidden"] is False and box["source"] == "box head"
        assert 0 <= box["left"] < 1 and 0 < box["width"] <= 1 and 0 <= box["top"] < 1
        assert "box head" in browser.evaluate("document.getElementById('box-caption').textContent")
        assert "calibrated" in browser.evaluate("document.getElementById('calibration').textContent")
        verdicts = browser.evaluate("document.getElementById('verdicts').textContent")
        assert "the threshold chosen for sensitivity 0.90" in verdicts
        assert "not a diagnosis" in browser.evaluate("document.getElementById('warning').textContent")
        assert browser.evaluate("window.asked") == 1  # asked once, not per request
        assert browser.evaluate("document.getElementById('page-errors').textContent") == ""
        assert browser.errors == []


def _trust_state(browser: Browser, url: str, image: Path) -> tuple[str, str]:
    """Upload ``image`` to the page at ``url``; the answer's trust state and the banner's text."""
    browser.open(url + "/")
    browser.wait_for("document.body.dataset.ready")
    browser.pick_file("#file", image)
    assert browser.wait_for("['done', 'error'].includes(document.body.dataset.state) && "
                            "document.body.dataset.state") == "done"
    return (browser.evaluate("document.body.dataset.trust"),
            browser.evaluate("document.getElementById('trust').hidden ? '' : document.getElementById('trust').textContent"))


def test_banners_when_the_image_is_unlike_the_training_images_or_the_model_abstains(
        server: str, module_tmp: Path, tmp_path: Path) -> None:
    from PIL import Image

    from tests.serve_fixtures import lesion_like

    blue, like = tmp_path / "blue.png", tmp_path / "lesion.png"
    Image.new("RGB", (200, 150), (30, 60, 200)).save(blue)   # not a lesion at all
    Image.fromarray(lesion_like(1, 48, seed=99)[0].transpose(1, 2, 0)).save(like)  # like the fitted images
    unsure = ModelService.load(module_tmp / "model.pt", ServeOptions(device="cpu", coverage=0.05))  # answers 5%
    with Browser(BROWSER) as browser, running_server(create_app(unsure)) as strict:
        browser.call("Page.addScriptToEvaluateOnNewDocument", source="window.prompt = () => 'k3y';")
        state, text = _trust_state(browser, server, blue)
        assert state == "ood" and "the probabilities below are not meaningful for this image" in text
        assert "dermoscopic" in text and browser.evaluate("document.getElementById('bars').className") == "greyed"
        state, text = _trust_state(browser, server, like)
        assert state in ("answered", "abstained") and "not meaningful" not in text
        state, text = _trust_state(browser, strict, like)
        assert state == "abstained" and "too unsure" in text and "not meaningful" not in text
        assert browser.evaluate("document.getElementById('bars').className") == "greyed"
        assert browser.evaluate("document.getElementById('page-errors').textContent") == "" and browser.errors == []
    unsure.close()


def test_a_bad_file_shows_the_servers_error(server: str, tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"not an image at all")
    with Browser(BROWSER) as browser:
        browser.call("Page.addScriptToEvaluateOnNewDocument", source="window.prompt = () => 'k3y';")
        browser.open(server + "/")
        browser.wait_for("document.body.dataset.ready")
        browser.pick_file("#file", bad)
        assert browser.wait_for("document.body.dataset.state === 'error' && "
                                "document.getElementById('error').textContent").startswith("notes.jpg: not an image")
        assert browser.errors == [] and any("400" in e for e in browser.network_errors)
