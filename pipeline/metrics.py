"""Evaluation metrics on labelled pairs."""

from __future__ import annotations

import numpy as np


def fpr_at_95_recall(distances: np.ndarray, labels: np.ndarray, recall: float = 0.95) -> float:
    """False positive rate at 95% recall (UBC PhotoTour protocol, HardNet's ``ErrorRateAt95Recall``).

    Pairs are sorted by descriptor distance; the threshold is the smallest distance ``t`` at which
    the pairs with ``distance <= t`` include 95% of the positives; FPR = FP / (FP + TN) over the
    negatives at that threshold. Ties are resolved as any threshold on a distance must resolve
    them: all pairs at distance ``t`` are on the same side (the reference's argsort order among
    ties is arbitrary, so it can differ from this by the tied negatives).
    """
    distances = np.asarray(distances, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if distances.shape != labels.shape:
        raise ValueError(f"distances {distances.shape} and labels {labels.shape} differ in length")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"FPR95 needs positives and negatives, got {n_pos} and {n_neg}")
    order = np.argsort(distances, kind="stable")
    d, pos = distances[order], labels[order]
    # Index of the first pair whose inclusion reaches the recall target...
    first = int(np.argmax(np.cumsum(pos) >= recall * n_pos))
    # ...and the threshold includes every pair tied with it.
    last = int(np.searchsorted(d, d[first], side="right"))
    false_positives = int((~pos[:last]).sum())
    return false_positives / n_neg
