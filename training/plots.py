"""PNG plots of an evaluation: ROC, precision-recall, calibration, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from phishgate.training.metrics import calibration_bins


def write_plots(
    y_true: np.ndarray,
    y_score: np.ndarray,
    threshold: float,
    labels: tuple[str, str],
    title: str,
    out_dir: Path,
) -> dict[str, Path]:
    """Write roc.png, pr.png, calibration.png and confusion.png; return their paths by name.

    `labels` is (negative, positive). Curves need both classes; with one class only the
    ROC and PR plots are skipped.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    both = len(np.unique(y_true)) == 2
    if both:
        fpr, tpr, _ = roc_curve(y_true, y_score)
        paths["roc"] = _line_plot(
            fpr,
            tpr,
            "false positive rate",
            "true positive rate",
            f"ROC: {title}",
            out_dir / "roc.png",
            diagonal=True,
        )
        precision, recall, _ = precision_recall_curve(y_true, y_score)
        paths["pr"] = _line_plot(
            recall,
            precision,
            "recall",
            "precision",
            f"Precision-recall: {title}",
            out_dir / "pr.png",
            diagonal=False,
        )
    paths["calibration"] = _calibration_plot(y_true, y_score, title, out_dir / "calibration.png")
    paths["confusion"] = _confusion_plot(
        y_true, (y_score >= threshold).astype(int), labels, title, out_dir / "confusion.png"
    )
    return paths


def _line_plot(
    x: np.ndarray,
    y: np.ndarray,
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
    *,
    diagonal: bool,
) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(x, y, lw=2)
    if diagonal:
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _calibration_plot(y_true: np.ndarray, y_score: np.ndarray, title: str, path: Path) -> Path:
    points = calibration_bins(y_true, y_score)
    mean_score = [mean for _, mean, _ in points]
    frac_pos = [frac for _, _, frac in points]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.plot(mean_score, frac_pos, marker="o", lw=2)
    ax.set(
        xlabel="mean predicted probability",
        ylabel="fraction positive",
        title=f"Calibration: {title}",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _confusion_plot(
    y_true: np.ndarray, y_pred: np.ndarray, labels: tuple[str, str], title: str, path: Path
) -> Path:
    matrix = np.array([[np.sum((y_true == t) & (y_pred == p)) for p in (0, 1)] for t in (0, 1)])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=12)
    ax.set_xticks([0, 1], labels=list(labels))
    ax.set_yticks([0, 1], labels=list(labels))
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
