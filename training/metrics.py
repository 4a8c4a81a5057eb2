"""Classification metrics in pure numpy (no scikit-learn dependency).

    accuracy(y_true, y_pred)                      # fraction correct
    confusion_matrix(y_true, y_pred, k)           # rows = true class, columns = predicted
    per_class_prf(cm)                             # precision, recall, F1, support per class
    roc_auc(y_true_binary, score)                 # Mann-Whitney rank statistic, ties count 1/2
    roc_curve(y_true_binary, score)               # (fpr, tpr, thresholds)
    classification_metrics(y_true, probs, pred)   # everything above as a JSON-able dict

For more than two classes ROC-AUC is the macro average of one-vs-rest AUCs.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def accuracy(y_true: Any, y_pred: Any) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def per_class_prf(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and F1 per class from a confusion matrix (0 where undefined)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)
    actual = cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual.astype(np.int64)}


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def roc_auc(y_true: Any, score: Any) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False/true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thresholds = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thresholds


def multiclass_auc(y_true: Any, probs: Any) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, np.int64)
    if probs.shape[1] == 2:
        return roc_auc(y == 1, probs[:, 1])
    aucs = [roc_auc(y == c, probs[:, c]) for c in range(probs.shape[1])]
    return float(np.nanmean(aucs))


def log_loss(y_true: Any, probs: Any, eps: float = 1e-12) -> float:
    probs = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0)
    y = np.asarray(y_true, np.int64)
    return float(-np.mean(np.log(probs[np.arange(len(y)), y])))


def classification_metrics(y_true: Any, probs: Any, y_pred: Any,
                           class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class P/R/F1, ROC-AUC, confusion matrix, log loss as plain Python types."""
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    prf = per_class_prf(cm)
    return {
        "n": int(len(y_true)),
        "accuracy": accuracy(y_true, y_pred),
        "roc_auc": multiclass_auc(y_true, probs),
        "log_loss": log_loss(y_true, probs),
        "confusion_matrix": cm.tolist(),
        "per_class": {
            name: {"precision": float(prf["precision"][i]), "recall": float(prf["recall"][i]),
                   "f1": float(prf["f1"][i]), "support": int(prf["support"][i])}
            for i, name in enumerate(class_names)
        },
        "macro_f1": float(np.mean(prf["f1"])),
    }


def map_correlation(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Pearson correlation of each pair of maps (N, h, w); NaN where a map is constant."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a ** 2).sum(axis=1) * (b ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return list((a * b).sum(axis=1) / norm)
