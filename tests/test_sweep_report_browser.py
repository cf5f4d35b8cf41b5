"""The sweep's report.html in a real browser: headless Chromium draws every figure, without a script error.

Skipped, with the reason, where no Chromium is installed (Debian: ``apt-get install chromium``; .ci/run
installs it when it runs as root). tests/browser.py loads the page and reads the DOM Chromium dumps
after the scripts ran: the page's own record of script errors (#page-errors) and each plotly figure's
drawn traces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser import find_chromium, render
from tests.synthetic_sweep import SweepShape, make_sweep
from core.evaluation.report import ReportInput, write_evaluation_report
from sweep.report import REPORT_FILE, write_sweep_page

BROWSER = find_chromium()
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (apt-get install chromium)")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every trial state and confirmation runs, and a final model's report in final/."""
    folder = make_sweep(tmp_path_factory.mktemp("browser") / "mixed", SweepShape(trials=10, epochs=4, confirm=2))
    final = folder / "final"
    final.mkdir()
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(final / "confusion_matrix.png")
    write_evaluation_report(final / "report.md", ReportInput(
        title="Final model of sweep mixed", facts=[("source", "`best.json`")],
        metrics={"test_balanced_accuracy": 0.61, "test_accuracy": 0.7},
        per_class={"mel": {"precision": 0.5, "recall": 0.6, "f1": 0.55, "support": 9}},
        figures=[("Confusion matrix", "confusion_matrix.png")]))
    write_sweep_page(folder)
    return folder


def test_every_figure_is_drawn_without_script_errors(sweep: Path) -> None:
    page = render(sweep / REPORT_FILE, browser=BROWSER)
    assert page.errors == ""
    assert [p.div_id for p in page.plots] == ["fig-history", "fig-importances", "fig-parallel", "fig-slices",
                                              "fig-curves"]
    assert all(p.drawn for p in page.plots), page.plots
    curves = page.plots[-1]
    assert curves.traces >= 5  # the trials by state, the best ones, the stop markers
    assert page.rendered_ms is not None  # the page's last script ran
    assert "Final model of sweep mixed" in page.dom and 'src="data:image/png;base64,' in page.dom


def test_a_running_sweep_draws_what_it_has(sweep: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "early"
    shutil.copytree(sweep, folder)
    for name in ("optuna.db", "best.json", "trials.csv"):
        (folder / name).unlink()
    write_sweep_page(folder)
    page = render(folder / REPORT_FILE, browser=BROWSER)
    assert page.errors == ""
    assert [p.div_id for p in page.plots] == ["fig-curves"] and page.plots[0].drawn  # the rest say why not


def test_the_check_catches_a_script_error_and_an_empty_plot(sweep: Path, tmp_path: Path) -> None:
    html = (sweep / REPORT_FILE).read_text(encoding="utf-8")
    broken = html.replace("</main>", '<div id="fig-empty" class="plotly-graph-div"></div>'
                                     '<script>Plotly.newPlot("fig-empty", [], {});</script>'
                                     '<script>throw new Error("made-up failure");</script></main>')
    path = tmp_path / "broken.html"
    path.write_text(broken, encoding="utf-8")
    page = render(path, browser=BROWSER)
    assert "made-up failure" in page.errors
    drawn = {p.div_id: p.drawn for p in page.plots}
    assert drawn["fig-empty"] is False and drawn["fig-curves"] is True
