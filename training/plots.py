"""The model card's plots: training curves, confusion matrix, ROC curve, reliability diagram.

    plot_confusion([[98, 2], [1, 99]], ("cat", "dog"), folder / "confusion_matrix.png")

Each takes the numbers of the evaluation JSON or the model's metadata and writes one PNG with
matplotlib's Agg backend (no display needed). :mod:`training.report` decides which are drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> bool:
    """Loss and accuracy per epoch, train and validation, head then fine-tune (False: none)."""
    if not history:
        return False
    plt = pyplot()
    x = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            y = [row.get(prefix + key) for row in history]
            y = [np.nan if v in (None, "") else float(v) for v in y]
            ax.plot(x, y, style, marker="o", ms=3, label=("validation " if prefix else "train ") + key)
        phases = [row.get("phase") for row in history]
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(i + 0.5, color="gray", lw=0.8, ls=":")
                ax.text(i + 0.6, ax.get_ylim()[0], " fine-tune", va="bottom", fontsize=8,
                        color="gray")
        ax.set_xlabel("epoch (head, then fine-tune)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_confusion(cm: list[list[int]], class_names: tuple[str, ...], path: Path) -> None:
    """The confusion matrix with its counts."""
    plt = pyplot()
    cm_arr = np.asarray(cm)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.2, 1.2 * k + 1.6), dpi=80)
    ax.imshow(cm_arr, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm_arr[i, j]), ha="center", va="center",
                    color="white" if cm_arr[i, j] > cm_arr.max() / 2 else "black")
    ax.set_xticks(range(k), class_names)
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_roc(roc: dict[str, Any], path: Path) -> None:
    """ROC curve per class, and its top-left corner enlarged."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), dpi=80)
    for ax, zoom in zip(axes, (False, True)):
        for name, r in roc.items():
            ax.plot(r["fpr"], r["tpr"], label=f"{name} (AUC {r['auc']:.4f})")
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_xlim(0, 0.1)
            ax.set_ylim(0.9, 1.001)
            ax.set_title("ROC (top-left corner)")
        else:
            ax.set_title("ROC curve")
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(before: dict[str, list], after: dict[str, list], ece_before: float,
                     ece_after: float, path: Path) -> None:
    """Reliability diagrams before and after temperature scaling."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), dpi=80, sharey=True)
    edges = np.asarray(after["edges"])
    width = edges[1] - edges[0]
    for ax, bins, title in ((axes[0], before, f"uncalibrated (ECE {ece_before:.4f})"),
                            (axes[1], after, f"calibrated (ECE {ece_after:.4f})")):
        acc = [np.nan if a is None else a for a in bins["accuracy"]]
        ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", alpha=0.7,
               label="accuracy")
        counts = np.asarray(bins["count"])
        for x0, c in zip(edges[:-1], counts):
            if c:
                ax.text(x0 + width / 2, 0.02, str(c), ha="center", fontsize=6, rotation=90)
        ax.plot([0, 1], [0, 1], color="red", lw=1, ls="--", label="perfect calibration")
        ax.set_xlabel("confidence (predicted class)")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy in bin")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("reliability diagram (15 bins; numbers = images per bin)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_faithfulness(scores: dict[str, Any], path: Path) -> None:
    """Averaged deletion, insertion and ROAD curves, one line per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method, s in scores.items():
        c = s["curves"]
        axes[0].plot(c["fractions"], c["deletion"], marker=".",
                     label=f"{method} (AUC {s['deletion_auc']:.3f})")
        axes[1].plot(c["fractions"], c["insertion"], marker=".",
                     label=f"{method} (AUC {s['insertion_auc']:.3f})")
        line, = axes[2].plot(c["road_fractions"], c["road_morf"], marker="v",
                             label=f"{method} MoRF")
        axes[2].plot(c["road_fractions"], c["road_lerf"], marker="^", linestyle="--",
                     color=line.get_color(), label=f"{method} LeRF (gap {s['road_gap']:.3f})")
    titles = ("Deletion (most relevant first; lower is better)",
              "Insertion (most relevant first; higher is better)",
              "ROAD, noisy linear imputation")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fraction of pixels removed" if ax is not axes[1] else "fraction inserted")
        ax.set_ylabel("P(explained class)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
