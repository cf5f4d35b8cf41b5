"""Open a page in headless Chromium and read what it drew: for the sweep page's browser test and for
``python -m bench.report_size`` (a test helper that the benchmark shares; one copy, here).

Not a command. Uses Debian's ``chromium`` (``apt-get install chromium``) or any Chrome on PATH, with
no Python package: ``--dump-dom`` gives the DOM after the page's scripts ran, ``--screenshot`` a PNG.
The sweep page (sweep/report.py) records its own script errors in ``#page-errors`` and the time its
last script ran in ``<body data-rendered-ms>``; :func:`render` reads both, and checks that every
plotly figure drew at least one trace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-extensions", "--mute-audio")


def find_chromium() -> str | None:
    """The browser to use: $CHROMIUM, else the first of BROWSERS on PATH; None if there is none."""
    given = os.environ.get("CHROMIUM")
    if given:
        return shutil.which(given)
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@dataclass
class Plot:
    div_id: str
    svgs: int = 0          # <svg class="main-svg"> plotly drew
    traces: int = 0        # trace groups holding at least one drawn path

    @property
    def drawn(self) -> bool:
        return self.svgs > 0 and self.traces > 0


@dataclass
class Rendered:
    dom: str
    wall_s: float                      # the browser's process, start to exit
    errors: str                        # the page's #page-errors text ('' when none)
    rendered_ms: float | None          # performance.now() when the page's last script ran
    plots: list[Plot] = field(default_factory=list)


def render(page: Path, *, browser: str | None = None, budget_ms: int | None = 15000,
           timeout_s: float = 180) -> Rendered:
    """Load ``page`` in headless Chromium and return its DOM after the scripts ran, parsed."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH")
    args = [browser, *FLAGS, "--dump-dom"]
    if budget_ms:
        args.append(f"--virtual-time-budget={budget_ms}")  # let timers (plotly's resize) run, quickly
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        started = time.perf_counter()
        done = subprocess.run([*args, f"--user-data-dir={profile}", Path(page).resolve().as_uri()],
                              capture_output=True, text=True, timeout=timeout_s, check=True)
        wall = time.perf_counter() - started
    parsed = _DomReader()
    parsed.feed(done.stdout)
    return Rendered(dom=done.stdout, wall_s=wall, errors=parsed.errors.strip(), rendered_ms=parsed.rendered_ms,
                    plots=parsed.plots)


def screenshot(page: Path, png: Path, *, width: int = 1400, height: int = 6000, browser: str | None = None,
               timeout_s: float = 180) -> Path:
    """A PNG of the page's first ``height`` pixels at ``width`` (Chromium cannot size it to the page)."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run([browser, *FLAGS, "--virtual-time-budget=15000", f"--window-size={width},{height}",
                        f"--screenshot={Path(png).resolve()}", f"--user-data-dir={profile}",
                        Path(page).resolve().as_uri()], capture_output=True, timeout=timeout_s, check=True)
    return Path(png)


class _DomReader(HTMLParser):
    """Plotly figures (and what they drew), #page-errors' text and body's data-rendered-ms."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.plots: list[Plot] = []
        self.errors = ""
        self.rendered_ms: float | None = None
        self._stack: list[tuple[str, Plot | None, dict | None]] = []   # tag, its figure, its trace group
        self._in_errors = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        plot, trace = self._stack[-1][1:] if self._stack else (None, None)
        if tag == "body" and a.get("data-rendered-ms"):
            self.rendered_ms = float(a["data-rendered-ms"])
        if tag == "div" and "plotly-graph-div" in classes:
            plot = Plot(a.get("id", "?"))
            self.plots.append(plot)
        if plot is not None:
            if tag == "svg" and "main-svg" in classes:
                plot.svgs += 1
            if tag == "g" and "trace" in classes:
                trace = {"drawn": False}
            if trace is not None and not trace["drawn"] and tag == "path" and a.get("d", "").startswith("M"):
                trace["drawn"] = True
                plot.traces += 1
        self._in_errors = self._in_errors or a.get("id") == "page-errors"
        if tag not in _VOID:
            self._stack.append((tag, plot, trace))

    def handle_endtag(self, tag: str) -> None:
        if self._in_errors and tag == "div":
            self._in_errors = False
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._in_errors:
            self.errors += data


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
