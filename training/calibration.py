"""Temperature scaling and expected calibration error, in pure numpy.

    t = fit_temperature(val_logits, val_labels)     # minimises validation NLL of logits / t
    probs = probabilities(logits, t)                # (N, C); binary logits are (N,) or (N, 1)
    ece = expected_calibration_error(probs, labels) # 15 equal-width confidence bins

Temperature scaling (Guo et al. 2017) divides the logits by one scalar ``t`` > 0: it changes
confidences, never the predicted class (for binary models with threshold 0.5). The fit is a
1-D search on ``log t``: a coarse grid over [1/20, 20] then golden-section refinement around
the best grid point; the NLL is smooth and unimodal in ``log t`` in practice.

With ``prior_sigma`` the fit is a MAP estimate under a log-normal prior on ``t`` centred on
``prior_center`` (penalty ``(log t - log c)^2 / (2 sigma^2)`` added to the *summed* NLL). A calibration set with almost
no mistakes makes the plain NLL keep falling as ``t -> 0`` (seen on pawcam's first real run:
200 validation photos, one error sitting at logit -0.02, fitted t = 0.07, which made test
probabilities saturate at exactly 0/1); the prior keeps ``t`` sensible unless the data
clearly say otherwise, and is negligible once the set holds a few dozen errors.
"""
from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 15


def probabilities(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities (N, C) from logits; one column of logits means a sigmoid unit."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    z = z / float(temperature)
    if z.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-np.clip(z[:, 0], -500, 500)))
        return np.stack([1.0 - p, p], axis=1)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``logits / temperature`` (stable)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim == 1:
        z = z[:, None]
    z = z / float(temperature)
    if z.shape[1] == 1:
        s = np.where(y == 1, z[:, 0], -z[:, 0])
        return float(np.mean(np.logaddexp(0.0, -s)))  # -log sigmoid(s)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def fit_temperature(logits: Any, labels: Any, t_min: float = 0.05, t_max: float = 20.0,
                    prior_sigma: float | None = None, prior_center: float = 1.0) -> float:
    """The temperature in [t_min, t_max] minimising the NLL of ``labels`` (+ optional prior
    on ``log t``, centred on ``log prior_center`` with standard deviation ``prior_sigma``)."""
    n = len(np.asarray(labels))
    if n == 0:
        return 1.0
    lo, hi = np.log(t_min), np.log(t_max)
    grid = np.linspace(lo, hi, 81)

    def objective(logits: Any, labels: Any, t: float) -> float:
        value = nll(logits, labels, t)
        if prior_sigma:
            value += (np.log(t) - np.log(prior_center)) ** 2 / (2.0 * prior_sigma ** 2 * n)
        return value

    losses = [objective(logits, labels, np.exp(g)) for g in grid]
    i = int(np.argmin(losses))
    a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = objective(logits, labels, np.exp(c)), objective(logits, labels, np.exp(d))
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = objective(logits, labels, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = objective(logits, labels, np.exp(d))
    return float(np.exp((a + b) / 2.0))


def reliability_bins(probs: Any, labels: Any, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width confidence bin: count, mean confidence, accuracy (None when empty).

    Confidence is the probability of the predicted (argmax) class; bins are (lo, hi], the
    first one [0, hi].
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts, confs, accs = [], [], []
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        counts.append(n)
        confs.append(float(conf[m].mean()) if n else None)
        accs.append(float(correct[m].mean()) if n else None)
    return {"edges": edges.tolist(), "count": counts, "confidence": confs, "accuracy": accs}


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = ECE_BINS) -> float:
    """ECE: sum over bins of (bin size / N) * |accuracy - mean confidence|."""
    bins = reliability_bins(probs, labels, n_bins)
    n = sum(bins["count"])
    if n == 0:
        return float("nan")
    return float(sum(c / n * abs(a - f) for c, a, f in
                     zip(bins["count"], bins["accuracy"], bins["confidence"]) if c))
