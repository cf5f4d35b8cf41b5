"""The PNG figures of an evaluation: confusion matrix, training curves, ROC curves, reliability diagrams.

Written by ``python -m core.final_train`` and ``python -m core.evaluate``; every function takes plain
arrays, draws with matplotlib's Agg backend (no display needed) and saves atomically.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: never try to open a window (servers, CI, Ray workers)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from core.io.atomic import save_figure  # noqa: E402
from core.metric_names import label  # noqa: E402
from core.model.calibration import ECE_BINS, expected_calibration_error, reliability_bins  # noqa: E402



def confusion_matrix_figure(confusion: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                            title: str = "Confusion matrix") -> None:
    """Counts and row-normalised rates side by side; rows are true classes, columns predictions."""
    confusion = np.asarray(confusion, dtype=np.int64)
    n = len(class_names)
    row_sums = confusion.sum(1, keepdims=True)
    rates = np.divide(confusion, row_sums, out=np.zeros(confusion.shape, dtype=float), where=row_sums > 0)
    side = max(4.0, 0.6 * n + 2.0)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.5, side), constrained_layout=True)
    font = 10 if n <= 8 else 8 if n <= 14 else 6
    panels = ((confusion, "counts", "d"), (rates, "row-normalised (recall on the diagonal)", ".2f"))
    for ax, (values, subtitle, fmt) in zip(axes, panels):
        shown = values / max(1, values.max()) if fmt == "d" else values
        image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
        for i in range(n):
            for j in range(n):
                text = format(values[i, j], fmt)
                ax.text(j, i, text, ha="center", va="center", fontsize=font,
                        color="white" if shown[i, j] > 0.55 else "black")
        ax.set_xticks(range(n), class_names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), [f"{name} (n={int(row_sums[i, 0])})" for i, name in enumerate(class_names)])
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(subtitle)
        if fmt != "d":
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{title} ({int(confusion.sum())} images)")
    save_figure(fig, path)


_CURVE_PANELS = (
    ("loss", (("train_loss", "train"), ("val_loss", "val"))),
    ("accuracy", (("train_accuracy", "train"), ("val_accuracy", "val"))),
    ("validation metrics", tuple((key, label(key)) for key in ("val_balanced_accuracy", "val_macro_f1", "val_auc"))),
)


def curves_figure(history: Sequence[Mapping[str, float]], path: str | os.PathLike, best_epoch: int | None = None,
                  title: str = "Training curves") -> None:
    """Loss and accuracy (train vs val) and the validation metrics per epoch; the chosen epoch marked."""
    epochs = [int(row["epoch"]) for row in history]
    fig, axes = plt.subplots(1, len(_CURVE_PANELS), figsize=(5.2 * len(_CURVE_PANELS), 4), constrained_layout=True)
    for ax, (name, series) in zip(axes, _CURVE_PANELS):
        for key, label in series:
            values = [float(row.get(key, math.nan)) for row in history]
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, marker="o" if len(epochs) <= 30 else None, markersize=3, label=label)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"chosen epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        if name != "loss":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    save_figure(fig, path)


def roc_figure(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
               title: str = "ROC curves (one class vs the rest)") -> None:
    """One ROC curve per class with both positives and negatives in ``labels``; AUC in the legend."""
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6.5, 6), constrained_layout=True)
    colors = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    skipped = []
    for c, name in enumerate(class_names):
        positive = labels == c
        if not 0 < positive.sum() < len(labels):
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        auc = roc_auc_score(positive, probs[:, c])
        ax.plot(fpr, tpr, color=colors(c), linewidth=1.6, label=f"{name}: AUC {auc:.3f} (n={int(positive.sum())})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title + (f"\nno curve (class absent): {', '.join(skipped)}" if skipped else ""), fontsize=10)
    save_figure(fig, path)


def reliability_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | os.PathLike,
                       title: str = "Reliability diagram") -> None:
    """Top-label reliability, one column per ``(name, labels, probs)`` (e.g. before and after calibration).

    Bars: accuracy per confidence bin (core/model/calibration.py's 15 bins), with the gap to the bin's mean
    confidence in red; on the diagonal a model is calibrated, below it over-confident. Underneath: how
    many images fall in each bin.
    """
    fig, axes = plt.subplots(2, len(panels), figsize=(4.8 * len(panels), 6.4), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": [4, 1]}, constrained_layout=True)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    width = edges[1] - edges[0]
    for column, (name, labels, probs) in enumerate(panels):
        top, bottom = axes[0, column], axes[1, column]
        count, accuracy, confidence = reliability_bins(labels, probs)
        used = count > 0
        top.bar(edges[:-1][used], accuracy[used], width=width, align="edge", color="tab:blue", edgecolor="white",
                label="accuracy")
        top.bar(edges[:-1][used], (confidence - accuracy)[used], bottom=accuracy[used], width=width, align="edge",
                color="none", edgecolor="tab:red", hatch="//", linewidth=0.8, label="gap to mean confidence")
        top.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=1, label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(f"{name}: ECE {expected_calibration_error(labels, probs):.3f}", fontsize=10)
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(edges[:-1], count, width=width, align="edge", color="grey", edgecolor="white")
        bottom.set_xlabel("confidence (top-class probability)")
        bottom.set_ylabel("images")
    fig.suptitle(f"{title} ({len(panels[0][1])} images, {ECE_BINS} bins)")
    save_figure(fig, path)
