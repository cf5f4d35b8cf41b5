"""sweep/report.py: a sweep's report.html, from folders written directly (tests/synthetic_sweep.py), no Ray.

The browser's view of the same pages is tests/test_sweep_report_browser.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.synthetic_sweep import SweepShape, make_sweep
from sweep.report import REPORT_FILE, main, read_sweep, write_sweep_page

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 search trials (complete, stopped early, one failed, one running) and 2 confirmation runs."""
    return make_sweep(tmp_path_factory.mktemp("report") / "mixed", SweepShape(
        trials=12, epochs=5, failed=1, running=1, confirm=2))


def _text(page: str) -> str:
    """The page's visible words, tags and the inlined plotly.js left out."""
    page = re.sub(r"<script>.*?</script>", " ", page, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", page).split())


def test_page_shows_every_trial_state_and_the_confirmation_runs(sweep: Path) -> None:
    page = write_sweep_page(sweep).read_text(encoding="utf-8")
    text = _text(page)
    table = pd.read_csv(sweep / "trials.csv")
    search = table[table["role"] == "search"]
    counts = search["status"].value_counts()
    assert counts["completed"] >= 2 and counts["stopped early"] >= 1 and counts["failed"] == 1
    assert (f"{counts['completed']} complete, {counts['stopped early']} stopped early, 1 failed, 1 running; "
            f"2 confirmation run(s)") in text
    assert "COMPLETE" in text and "PRUNED" in text and "FAIL" in text  # optuna.db's own states
    for trial_id in table["trial_id"]:
        assert f'href="trials/{trial_id}/"' in page  # every trial links its folder
        assert f"runFilter=trials/{trial_id}#timeseries" in page  # and its TensorBoard run
    assert "CUDA out of memory (made up)" in text  # the failed trial's error
    best = json.loads((sweep / "best.json").read_text())
    assert best["trial_id"] in text and "confirmation" in text and f"{best['confirmation']['mean']:.4g}" in text
    for key in ("history", "importances", "parallel", "slices", "curves"):
        assert f'id="fig-{key}"' in page, key
    assert "No final model yet" in text and "python -m core.final_train" in text


def test_learning_curves_mark_stops_and_hold_every_trial(sweep: Path) -> None:
    page = write_sweep_page(sweep).read_text(encoding="utf-8")
    curves = page[page.index('id="fig-curves"'):]
    curves = curves[:curves.index("</script>")]
    table = pd.read_csv(sweep / "trials.csv")
    stopped = table[table["status"] == "stopped early"]
    assert f'"name":"stopped early ({len(stopped)})"' in curves and '"name":"stopped early: last epoch"' in curves
    assert '"name":"confirmation (2)"' in curves and '"symbol":"x"' in curves
    ran = [t for t in table["trial_id"] if (sweep / "trials" / t / "metrics.csv").is_file()]
    assert all(f'"{t}"' in curves for t in ran)


def test_page_is_self_contained(sweep: Path) -> None:
    page = write_sweep_page(sweep).read_text(encoding="utf-8")
    tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", page, flags=re.I)
    assert tags and not [t for t in tags if re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", t, re.I)]
    assert page.count("<script>") == page.count("</script>") and page.count("Plotly.newPlot") == 5
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:200]) == 1  # plotly.js inlined once for the whole page


def test_page_before_the_new_trials_csv_columns_and_with_a_search_only_sweep(tmp_path: Path) -> None:
    folder = make_sweep(tmp_path / "old", SweepShape(trials=5, epochs=3, failed=0, running=0, confirm=0,
                                                     role_column=False))
    assert "role" not in pd.read_csv(folder / "trials.csv")
    sweep = read_sweep(folder)
    assert set(sweep.trials["role"]) == {"search"}
    text = _text(write_sweep_page(folder).read_text(encoding="utf-8"))
    assert "5 of 5 search trials recorded" in text and "0 confirmation run(s)" in text


def test_page_of_an_incomplete_sweep(sweep: Path, tmp_path: Path) -> None:
    """What a running sweep's folder may hold: no optuna.db, best.json or trials.csv yet, a trial without its
    metrics.csv, a trial.json newer than trials.csv."""
    folder = tmp_path / "running"
    shutil.copytree(sweep, folder)
    for name in ("best.json", "trials.csv", "optuna.db", "splits.csv", REPORT_FILE):
        (folder / name).unlink(missing_ok=True)
    first = sorted((folder / "trials").iterdir())[0]
    (first / "metrics.csv").unlink()
    record = json.loads((first / "trial.json").read_text())
    record.update(status="running", ended=None, duration_s=None, final=None, best=None, epochs_run=None)
    (first / "trial.json").write_text(json.dumps(record))
    text = _text(write_sweep_page(folder).read_text(encoding="utf-8"))
    assert "No best.json yet" in text and "trial(s) running when this page was made" in text
    assert "No complete trial in optuna.db yet" in text and "splits.csv not written yet" in text
    assert first.name in text

    shutil.rmtree(folder / "trials")  # just created: settings only
    text = _text(write_sweep_page(folder).read_text(encoding="utf-8"))
    assert "No trial has started yet" in text and "no trial has started yet" in text


def test_not_a_sweep_folder_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "trials.csv").write_text("trial_id\n")
    for target in (tmp_path, tmp_path / "absent"):
        done = subprocess.run([sys.executable, "-m", "sweep.report", str(target)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and not done.stdout, done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and str(target) in done.stderr
    (tmp_path / "sweep.json").write_text("[1, 2]")
    with pytest.raises(Exception, match="expected a JSON object"):
        main([str(tmp_path)])
    assert not (tmp_path / REPORT_FILE).exists()


def test_refresh_sweep_page_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from sweep.report import refresh_sweep_page

    assert refresh_sweep_page(tmp_path) is None
    assert "report.html not written" in caplog.text and "not a sweep folder" in caplog.text


def test_final_training_writes_report_html_and_adds_its_section(tmp_path: Path) -> None:
    """A tiny real core.final_train (demo data, 32 px, 1 epoch) from a generated sweep's best.json."""
    from core.config import TrainConfig
    from core.data.dataset import load_for_config, write_splits
    from core.data.demo_data import generate_demo
    from core.final_train import FinalOptions, final_train

    root = generate_demo(tmp_path / "data", n_lesions=30, image_size=32, seed=0)
    folder = make_sweep(tmp_path / "sweep", SweepShape(trials=3, epochs=2, failed=0, running=0, confirm=0,
                                                       data=str(root)))
    best = json.loads((folder / "best.json").read_text())
    best["config"].update(batch_size=8, warmup_epochs=0.0, device="cpu")
    data = load_for_config(root, TrainConfig.from_dict(best["config"]), progress=False)
    write_splits(data, folder / "splits.csv")
    best["data"] = {"path": data.root, "fingerprint": data.fingerprint, "layout": data.layout}
    (folder / "best.json").write_text(json.dumps(best))
    assert "No final model yet" in _text(write_sweep_page(folder).read_text(encoding="utf-8"))

    result = final_train(folder / "best.json", FinalOptions(epochs=1, gallery_per_class=1, progress=False))
    final_page = (result.out_dir / "report.html").read_text(encoding="utf-8")
    markdown = result.report.read_text(encoding="utf-8")
    assert "<script" not in final_page and "http" not in final_page.split("</style>")[1]
    images = re.findall(r'<img alt="[^"]*" src="data:image/(?:png|jpeg);base64,', final_page)
    assert len(images) == markdown.count("![")  # every figure of report.md, inside the one file
    assert 'src="data:image/jpeg;base64,' in final_page  # the Grad-CAM galleries, as JPEG
    for number in re.findall(r"\| (\d\.\d{4}) \|", markdown):  # the same metrics as report.md
        assert f">{number}<" in final_page

    page = (folder / REPORT_FILE).read_text(encoding="utf-8")
    section = page[page.index('<section id="final">'):]
    assert "Final model of sweep sweep" in section and "Test metrics" in section
    assert len(re.findall(r'src="data:image/(?:png|jpeg);base64,', section)) == len(images)


def test_page_states_a_trial_epoch_budget(tmp_path: Path) -> None:
    folder = make_sweep(tmp_path / "budget", SweepShape(trials=4, epochs=3, failed=0, running=0, confirm=0))
    doc = json.loads((folder / "sweep.json").read_text())
    doc["settings"]["budget"] = 7
    (folder / "sweep.json").write_text(json.dumps(doc))
    text = _text(write_sweep_page(folder).read_text(encoding="utf-8"))
    assert "(no new trial after 7 trial-epochs)" in text and "--budget 7" in text
    assert "(--budget 7: no new trial after it; running trials finish)" in text
