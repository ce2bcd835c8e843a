"""FPR95 against brute force over every threshold, HardNet's reference code, and sklearn's ROC."""

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from pipeline.metrics import fpr_at_95_recall


def brute_force_fpr95(d, labels, recall=0.95):
    """Try every candidate threshold t (predict positive iff d <= t); take the smallest t whose
    recall reaches the target; report that threshold's false positive rate."""
    pos, neg = labels == 1, labels == 0
    for t in sorted(set(d.tolist())):
        if (d[pos] <= t).sum() >= recall * pos.sum():
            return (d[neg] <= t).sum() / neg.sum()
    raise AssertionError("unreachable")


def hardnet_reference(labels, scores):
    """``ErrorRateAt95Recall`` from the HardNet repository (EvalMetrics.py), verbatim logic."""
    distances = 1.0 / (scores + 1e-8)
    labels = labels[np.argsort(distances)]
    threshold_index = np.argmax(np.cumsum(labels) >= 0.95 * np.sum(labels))
    FP = np.sum(labels[:threshold_index] == 0)
    TN = np.sum(labels[threshold_index:] == 0)
    return float(FP) / float(FP + TN)


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    # Few distinct values: many ties between positives and negatives.
    d = rng.integers(0, 12, n).astype(float) - 2.0 * labels * rng.random(n).round(1)
    assert fpr_at_95_recall(d, labels) == pytest.approx(brute_force_fpr95(d, labels))


@pytest.mark.parametrize("seed", range(5))
def test_matches_hardnet_reference_without_ties(seed):
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 2, 1000)
    d = rng.random(1000) + 0.5 * (1 - labels)
    scores = 1.0 / d
    # The reference excludes the threshold pair itself; with distinct distances that pair is a positive.
    assert fpr_at_95_recall(d, labels) == pytest.approx(hardnet_reference(labels, scores))


def test_agrees_with_sklearn_roc():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 5000)
    d = rng.normal(size=5000) + 1.5 * (1 - labels)
    fpr, tpr, _ = roc_curve(labels, -d)  # score = -distance
    expected = fpr[np.argmax(tpr >= 0.95)]
    assert fpr_at_95_recall(d, labels) == pytest.approx(expected)


def test_hand_computed_case():
    # positives at distances 1..20, negatives at 0.5, 15.5, 30. 95% of 20 positives = 19 -> t = 19
    d = np.array(list(range(1, 21)) + [0.5, 15.5, 30.0])
    labels = np.array([1] * 20 + [0, 0, 0])
    assert fpr_at_95_recall(d, labels) == pytest.approx(2 / 3)


def test_rejects_missing_class():
    with pytest.raises(ValueError, match="positives and negatives"):
        fpr_at_95_recall(np.ones(4), np.ones(4))
