"""Drive headless Chromium over the DevTools protocol: open a page, pick a file in an <input>, read the DOM.

For the serving page's browser test (tests/test_serve_browser.py) and its screenshot: the page needs a
real upload, which ``chromium --dump-dom`` cannot do. Uses Debian's ``chromium`` (or $CHROMIUM) and the
``websockets`` client (installed with uvicorn); no browser-automation package.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--mute-audio", "--remote-debugging-port=0", "--remote-allow-origins=*")


def find_chromium() -> str | None:
    given = os.environ.get("CHROMIUM")
    return shutil.which(given) if given else next((p for p in map(shutil.which, BROWSERS) if p), None)


class Browser:
    """One headless Chromium with one page; ``errors`` collects its script and console errors, ``network_errors``
    the requests answered with an error status."""

    def __init__(self, browser: str, width: int = 1280, height: int = 900) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-cdp-")
        self._process = subprocess.Popen([browser, *FLAGS, f"--window-size={width},{height}",
                                          f"--user-data-dir={self._profile.name}", "about:blank"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = self._devtools_port()
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        target = next(p for p in pages if p.get("type") == "page")
        self._ws = connect(target["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=10)
        self._next_id, self.errors, self.network_errors = 0, [], []
        for domain in ("Page", "Runtime", "Log", "DOM"):
            self.call(f"{domain}.enable")

    def _devtools_port(self) -> int:
        assert self._process.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self._process.stderr.readline()
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                return int(found.group(1))
            if not line and self._process.poll() is not None:
                break
        raise RuntimeError("chromium did not open its DevTools port")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        self._ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=60))
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._note(message)

    def _note(self, event: dict[str, Any]) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append((details.get("exception") or {}).get("description") or details.get("text", "?"))
        elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif event.get("method") == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]   # a 4xx answer the page handles is the network's entry, not a script error
            (self.network_errors if entry.get("source") == "network" else self.errors).append(entry.get("text", "?"))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 30) -> Any:
        """Poll a JavaScript expression until it is truthy; its value (TimeoutError past ``timeout_s``). One that
        throws (document.body before the page has loaded) counts as not yet."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"waited {timeout_s} s for {expression}")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def pick_file(self, selector: str, path: Path) -> None:
        """Set a file <input>'s file, as a user picking it would (fires its change event)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(Path(path).resolve())])

    def screenshot(self, png: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        Path(png).write_bytes(base64.b64decode(data))
        return Path(png)

    def close(self) -> None:
        try:
            self._ws.close()
        finally:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            for attempt in range(10):
                try:
                    self._profile.cleanup()
                    break
                except OSError:  # Chromium's helper processes can still write to the profile for a moment after it
                    if attempt == 9:  # exits ("Directory not empty: 'Default'", seen with two pytest workers)
                        raise
                    time.sleep(0.5)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
