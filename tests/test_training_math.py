"""Calibration and metrics: pure numpy, checked against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from training import calibration, metrics


def test_confusion_matrix_and_prf_by_hand():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 1, 0, 1, 1, 1]
    cm = metrics.confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    prf = metrics.per_class_prf(cm)
    # class 0: tp 2, predicted 2, actual 3; class 1: tp 2, predicted 4, actual 2; class 2: none
    assert prf["precision"] == pytest.approx([1.0, 0.5, 0.0])
    assert prf["recall"] == pytest.approx([2 / 3, 1.0, 0.0])
    assert prf["f1"] == pytest.approx([0.8, 2 / 3, 0.0])
    assert prf["support"].tolist() == [3, 2, 1]
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(4 / 6)


def test_roc_auc_by_hand_with_ties():
    # positives 0.8, 0.4; negatives 0.6, 0.4, 0.1
    # pairs: (0.8 > all three) = 3, (0.4 vs 0.6) = 0, (0.4 vs 0.4) = 0.5, (0.4 vs 0.1) = 1
    y = [1, 0, 1, 0, 0]
    s = [0.8, 0.6, 0.4, 0.4, 0.1]
    assert metrics.roc_auc(y, s) == pytest.approx(4.5 / 6)
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    fpr, tpr, _ = metrics.roc_curve(y, s)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(4.5 / 6)


def test_classification_metrics_dict():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    m = metrics.classification_metrics([0, 1, 1, 1], probs, [0, 1, 0, 1], ("cat", "dog"))
    assert m["accuracy"] == 0.75
    assert m["roc_auc"] == 1.0
    assert m["confusion_matrix"] == [[1, 0], [1, 2]]
    assert m["per_class"]["dog"]["recall"] == pytest.approx(2 / 3)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.7, 0.4, 0.8])))


def test_ece_by_hand():
    # two bins used: conf 0.9 (2 images, 1 right) and conf 0.6 (2 images, 2 right)
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 0, 0, 1])
    ece = calibration.expected_calibration_error(probs, labels)
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    bins = calibration.reliability_bins(probs, labels)
    assert sum(bins["count"]) == 4 and len(bins["count"]) == 15


def test_temperature_lowers_ece_on_overconfident_model():
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.integers(0, 2, n)
    true_logit = rng.normal(0, 2.0, n) * np.where(y == 1, 1, -1) + np.where(y == 1, 1.0, -1.0)
    # labels drawn from the "true" probabilities, logits reported 3x too large
    y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    logits = 3.0 * true_logit
    t = calibration.fit_temperature(logits, y)
    assert 2.4 < t < 3.6
    before = calibration.expected_calibration_error(calibration.probabilities(logits), y)
    after = calibration.expected_calibration_error(calibration.probabilities(logits, t), y)
    assert after < before / 3 and after < 0.03
    assert calibration.nll(logits, y, t) < calibration.nll(logits, y, 1.0)


def test_temperature_softmax_matches_sigmoid_case():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 4, 500)
    y = (rng.random(500) < 1 / (1 + np.exp(-z / 2))).astype(int)
    t1 = calibration.fit_temperature(z, y)
    # the same model as a 2-way softmax: logits (0, z)
    t2 = calibration.fit_temperature(np.stack([np.zeros_like(z), z], axis=1), y)
    assert t1 == pytest.approx(t2, rel=1e-3)
    p = calibration.probabilities(z, 2.0)
    assert p.shape == (500, 2) and np.allclose(p.sum(axis=1), 1)


def test_uncalibrated_inverts_temperature():
    from training.evaluate import uncalibrated

    z = np.array([-3.0, 0.5, 4.0])
    t = 2.5
    calibrated = calibration.probabilities(z, t)
    assert np.allclose(uncalibrated(calibrated, t, binary=True), calibration.probabilities(z))
    zz = np.array([[1.0, 2.0, -1.0], [0.0, 0.0, 3.0]])
    assert np.allclose(uncalibrated(calibration.probabilities(zz, t), t, binary=False),
                       calibration.probabilities(zz))


def test_stratified_split_is_seeded_and_stratified():
    from training.dataset import stratified_split

    labels = np.array([0] * 50 + [1] * 30)
    tr, va = stratified_split(labels, 0.1, seed=3)
    tr2, va2 = stratified_split(labels, 0.1, seed=3)
    assert va.tolist() == va2.tolist() and tr.tolist() == tr2.tolist()
    assert np.bincount(labels[va]).tolist() == [5, 3]
    assert sorted(np.r_[tr, va].tolist()) == list(range(80))


def test_prior_keeps_temperature_sane_when_calibration_set_has_no_real_errors():
    # 199 confident right answers and one mistake on the boundary: plain NLL wants t -> 0
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(100, int), np.zeros(100, int)]
    z = np.where(y == 1, 1, -1) * rng.uniform(4, 12, 200)
    z[0] = -0.02
    plain = calibration.fit_temperature(z, y)
    t = calibration.fit_temperature(z, y, prior_sigma=1.0)
    assert plain < 0.5 and plain < t < 1.0
    # with many real mistakes the prior hardly matters (see the over-confident case above)


def test_install_only_when_better_beyond_noise():
    from training.train import is_better

    base = {"accuracy": 0.9885, "roc_auc": 0.99830, "log_loss": 0.050}
    assert is_better({**base, "accuracy": 0.9890}, base)
    assert not is_better({**base, "accuracy": 0.9880, "roc_auc": 0.9999}, base)
    assert not is_better({**base, "roc_auc": 0.99834}, base)        # noise
    assert is_better({**base, "roc_auc": 0.99845}, base)
    assert not is_better(base, base)
    assert is_better({**base, "log_loss": 0.045}, base)
