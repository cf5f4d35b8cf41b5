"""core.evaluation.figures and core.evaluation.report: the PNGs decode, show what they claim, and report.md links them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.explain.gallery import GalleryItem, gradcam_gallery_figure
from core.evaluation.figures import confusion_matrix_figure, curves_figure, roc_figure
from core.evaluation.report import ReportInput, render_report, write_evaluation_report

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def _png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every matplotlib figure core.evaluation.figures saves, kept open to read what it shows."""
    import core.evaluation.figures as figures

    kept: list = []
    save = figures.save_figure

    def keep(fig, path, **kw) -> None:
        kept.append(fig)
        save(fig, path, **kw)

    monkeypatch.setattr(figures, "save_figure", keep)
    monkeypatch.setattr(figures.plt, "close", lambda fig: None)
    yield kept
    import matplotlib.pyplot as plt

    for fig in kept:
        plt.close(fig)


def test_confusion_matrix_figure(tmp_path: Path, drawn: list) -> None:
    confusion = np.arange(49).reshape(7, 7)
    confusion[2] = 0  # a class without images: its rates are zeros, not NaN
    confusion_matrix_figure(confusion, CLASSES, tmp_path / "cm.png")
    _png(tmp_path / "cm.png")
    counts, rates = (ax for ax in drawn[0].axes if ax.images)
    assert [t.get_text() for t in counts.texts][7 * 3 + 4] == str(confusion[3, 4])  # row 3, column 4
    rate_texts = [t.get_text() for t in rates.texts]
    assert rate_texts[7 * 3 + 3] == f"{confusion[3, 3] / confusion[3].sum():.2f}"   # recall of class 3
    assert rate_texts[7 * 2:7 * 3] == ["0.00"] * 7                                  # the empty class
    assert [t.get_text() for t in counts.get_yticklabels()][2] == "bkl (n=0)"
    assert f"({confusion.sum()} images)" in drawn[0]._suptitle.get_text()


def test_curves_figure_handles_missing_and_nan_values(tmp_path: Path, drawn: list) -> None:
    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.2 / e, "train_accuracy": 0.1 * e,
                "val_accuracy": 0.09 * e, "val_balanced_accuracy": 0.05 * e, "val_macro_f1": 0.04 * e,
                "val_auc": float("nan") if e == 1 else 0.5 + 0.04 * e} for e in range(1, 6)]
    del history[0]["val_macro_f1"]
    curves_figure(history, tmp_path / "curves.png", best_epoch=4)
    _png(tmp_path / "curves.png")
    loss, accuracy, metrics = drawn[0].axes
    lines = {line.get_label(): line for line in metrics.lines}
    assert np.isnan(lines["macro F1"].get_ydata()[0]) and lines["macro F1"].get_ydata()[1] == pytest.approx(0.08)
    assert np.isnan(lines["macro AUC"].get_ydata()[0]) and lines["macro AUC"].get_ydata()[4] == pytest.approx(0.7)
    assert [line.get_label() for line in loss.lines] == ["train", "val", "chosen epoch 4"]
    assert all(ax.lines[-1].get_xdata()[0] == 4 for ax in (loss, accuracy, metrics))  # the chosen epoch marked


def test_roc_figure_skips_absent_classes(tmp_path: Path, drawn: list) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 60)  # nv and vasc (classes 5 and 6) absent
    probs = rng.dirichlet(np.ones(7), 60)
    probs[np.arange(60), labels] += 1.0
    probs /= probs.sum(1, keepdims=True)
    roc_figure(labels, probs, CLASSES, tmp_path / "roc.png")
    _png(tmp_path / "roc.png")
    (ax,) = drawn[0].axes
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert len(legend) == 6 and legend[-1] == "chance"                  # five curves and the diagonal
    auc = roc_auc_score(labels == 4, probs[:, 4])
    assert legend[4] == f"mel: AUC {auc:.3f} (n={int((labels == 4).sum())})"
    assert ax.get_title().endswith("no curve (class absent): nv, vasc")


def test_gallery_figure_with_and_without_items(tmp_path: Path) -> None:
    image = np.full((40, 40, 3), 200, dtype=np.uint8)
    items = [GalleryItem(image, image, f"ISIC_{i:07d}", "mel", "nv" if i % 2 else "mel", 0.5 + i / 20)
             for i in range(8)]
    gradcam_gallery_figure("mel", items, tmp_path / "g.png")
    pixels = _png(tmp_path / "g.png")
    assert pixels.shape[0] > 800 and pixels.shape[1] > 800  # 8 examples: two blocks of four image/map pairs
    gradcam_gallery_figure("df", [], tmp_path / "empty.png")
    _png(tmp_path / "empty.png")


def test_no_figure_is_left_open(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    confusion_matrix_figure(np.eye(2, dtype=int), ("a", "b"), tmp_path / "cm.png")
    with pytest.raises(Exception):
        roc_figure(np.array([0, 1]), np.zeros((2, 2)), ("a", "b"), tmp_path / "nope" / "\0bad.png")
    assert len(plt.get_fignums()) == before
    assert not list(tmp_path.glob("**/.*.tmp"))  # atomic writes leave no temporary file


def test_report_lists_metrics_classes_figures_and_config(tmp_path: Path) -> None:
    report = ReportInput(
        title="Final model of sweep demo", facts=[("data", "`/data/ham`")],
        metrics={"test_accuracy": 0.8125, "test_balanced_accuracy": 0.5, "test_macro_f1": 0.25,
                 "test_auc": float("nan"), "test_loss": 0.75},
        per_class={"mel": {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 4},
                   "nv": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 12}},
        figures=[("Confusion matrix", "confusion_matrix.png")], galleries={"mel": "gradcam_mel.png"},
        config={"lr": 0.001, "optimizer": "adamw"}, notes=["a note"],
        commands=[("Predict", "python -m core.predict model.pt x.jpg")])
    text = render_report(report)
    assert text.startswith("# Final model of sweep demo\n")
    assert "| accuracy | 0.8125 |" in text and "| macro ROC AUC (one vs rest) | n/a |" in text
    assert "| mel | 0.5000 | 0.2500 | 0.3333 | 4 |" in text
    assert "![Confusion matrix](confusion_matrix.png)" in text and "(gradcam_mel.png)" in text
    assert "| lr | `0.001` |" in text and "| optimizer | `'adamw'` |" in text
    assert "> a note" in text and "python -m core.predict model.pt x.jpg" in text
    write_evaluation_report(tmp_path / "report.md", report)
    assert (tmp_path / "report.md").read_text() == text


def test_a_final_report_fills_the_slots_of_the_page_above_it_and_nothing_else(tmp_path: Path) -> None:
    """core.final_train's last step: the sweep page's final-model slots get the report, in place."""
    from core.evaluation.report import final_link, show_in_parent_page, slot

    final = tmp_path / "final"
    write_evaluation_report(final / "report.md", ReportInput(
        title="Final model of sweep s", facts=[], metrics={"test_accuracy": 0.75}, per_class={}, figures=[]))
    page = tmp_path / "report.html"
    assert not show_in_parent_page(final, tmp_path)                       # no page: nothing written
    page.write_text("<p>a page without slots</p>")
    assert not show_in_parent_page(final, tmp_path) and page.read_text() == "<p>a page without slots</p>"
    page.write_text(f"<h1>sweep</h1>{slot('link', 'final', '<p>Next: train</p>')}<hr>"
                    f"{slot('section', 'final', '<p>No final model yet.</p>')}<footer>")
    assert show_in_parent_page(final, tmp_path)
    text = page.read_text()
    assert text.startswith("<h1>sweep</h1>") and text.endswith("<footer>") and "No final model yet" not in text
    assert final_link() in text and "Final model of sweep s" in text and "0.7500" in text
    assert show_in_parent_page(final, tmp_path) and page.read_text() == text   # again: the same page
    assert not show_in_parent_page(final, tmp_path / "elsewhere")          # not the page above final/
