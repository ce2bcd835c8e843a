"""Evaluation metrics on labelled pairs.

ROC AUC and AP are scikit-learn's. Two stay written out here on purpose: FPR95, whose tie rule (every
pair at the threshold distance on the same side) is a choice the PhotoTour figures depend on and that
differs from HardNet's reference code (which splits tied pairs by sort order), so it is spelled out
where it is applied, in one sort instead of a whole ROC curve; and the HPatches AP, a trapezoid over
every single item in list order (no tie grouping, a start at precision 1), which no scikit-learn
metric computes.
"""

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
    return _fpr_at_recall_sorted(distances[order], labels[order], np.ones(len(order), dtype=np.int64), recall)


def _fpr_at_recall_sorted(d: np.ndarray, pos: np.ndarray, counts: np.ndarray, recall: float) -> float:
    """FPR at ``recall`` of pairs sorted by distance ``d``, each counted ``counts`` times (1 for a plain
    set, its draws for a bootstrap resample)."""
    positive_counts = counts * pos
    cum_pos = np.cumsum(positive_counts)
    n_pos = int(cum_pos[-1])
    # Index of the first pair whose inclusion reaches the recall target (the cumulative count only rises
    # at pairs counted)...
    first = int(np.argmax(cum_pos >= recall * n_pos))
    # ...and the threshold includes every pair tied with it.
    last = int(np.searchsorted(d, d[first], side="right"))
    false_positives = int((counts[:last] - positive_counts[:last]).sum())
    return false_positives / (int(counts.sum()) - n_pos)


# Resamples per bootstrap interval. At 200 the 97.5 % end itself moved by ~0.0015 FPR95 between bootstrap
# seeds on 20,000 pairs (0.004-0.008 on graf's 8514), the size of the differences the zoo rules on; at 2000
# that Monte Carlo error is ~3x smaller, and FPR95's resamples cost ~0.2 ms each on 20,000 pairs.
BOOTSTRAP_RESAMPLES = 2000


def _resampled(labels: np.ndarray, statistic, n: int, seed: int) -> list[float]:
    """``statistic(idx)`` over ``n`` resamples ``idx`` of the pairs, drawn with replacement; resamples
    holding one class only are skipped (no metric here is defined on them)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        if 0 < labels[idx].sum() < len(idx):
            values.append(statistic(idx))
    return values


def _on_resample(metric, distances: np.ndarray, labels: np.ndarray):
    """``idx -> metric(distances[idx], labels[idx])``. For FPR95 the pairs are sorted once and each resample
    is counts per pair (the same value to the last bit, tested; ~11x faster than sorting every resample)."""
    if metric is not fpr_at_95_recall:
        return lambda idx: metric(distances[idx], labels[idx])
    d, pos = _pairs(distances, labels)
    order = np.argsort(d, kind="stable")
    d, pos = d[order], pos[order]

    def fpr95(idx: np.ndarray) -> float:
        return _fpr_at_recall_sorted(d, pos, np.bincount(idx, minlength=len(d))[order], 0.95)

    return fpr95


def bootstrap_interval(distances: np.ndarray, labels: np.ndarray, metric, n: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                       ) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``metric(distances, labels)`` over the pairs."""
    values = _resampled(np.asarray(labels), _on_resample(metric, distances, labels), n, seed)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def paired_bootstrap_difference(distances_a: np.ndarray, distances_b: np.ndarray, labels: np.ndarray, metric,
                                n: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """``metric(a) - metric(b)`` for two models scored on the same pairs, with its 95 % percentile bootstrap
    interval, both models scored on each resample of the pairs (the test of "a beats b on these pairs").

    Two marginal intervals (``bootstrap_interval`` per model) overlap long after such a difference is
    clear: most of their width is which hard and easy pairs were drawn, and both models share that draw."""
    if len(distances_a) != len(labels) or len(distances_b) != len(labels):
        raise ValueError(f"distances {len(distances_a)} and {len(distances_b)} and labels {len(labels)} differ in length")
    on_a, on_b = _on_resample(metric, distances_a, labels), _on_resample(metric, distances_b, labels)
    values = _resampled(np.asarray(labels), lambda idx: on_a(idx) - on_b(idx), n, seed)
    point = metric(distances_a, labels) - metric(distances_b, labels)
    return float(point), float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def _pairs(distances: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if d.shape != y.shape:
        raise ValueError(f"distances {d.shape} and labels {y.shape} differ in length")
    return d, y


def roc_auc(distances: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve with score = -distance: P(d_pos < d_neg) + P(d_pos == d_neg) / 2
    (``sklearn.metrics.roc_auc_score``)."""
    d, y = _pairs(distances, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs positives and negatives, got {n_pos} and {n_neg}")
    from sklearn.metrics import roc_auc_score  # imported here: sklearn adds ~1.3 s to every Train worker's start

    return float(roc_auc_score(y, -d))


def average_precision(distances: np.ndarray, labels: np.ndarray) -> float:
    """Average precision with score = -distance: sum over distinct thresholds of (R_k - R_{k-1}) * P_k,
    tied pairs entering together (a step function, no interpolation;
    ``sklearn.metrics.average_precision_score``)."""
    d, y = _pairs(distances, labels)
    if int(y.sum()) == 0:
        raise ValueError("average precision needs at least one positive")
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, -d))


# ---- HPatches (Balntas et al. 2017, github.com/hpatches/hpatches-benchmark, python/utils) -------------
# The benchmark's AP is ``metrics.pr``: items are sorted by distance with a stable sort (ties keep the
# input order), precision/recall are taken after every single item (no tie grouping), the curve starts
# at (recall 0, precision 1), and AP is the trapezoidal area under precision(recall). Positives that
# are never retrieved still count in the recall denominator (``numpos``). Note this is NOT sklearn's
# step-wise AP: the trapezoid credits half of the previous precision at each recall step.
_SMALL = 1e-10  # the benchmark's guard against 0/0


def hpatches_ap(distances: np.ndarray, labels: np.ndarray, numpos: int | None = None) -> float:
    """The benchmark's ``pr(-distances, labels, numpos)[2]``; items at distance +inf are never retrieved."""
    d, y = _pairs(distances, labels)
    p = int(y.sum()) if numpos is None else int(numpos)
    if p < int(y.sum()):
        raise ValueError(f"numpos={numpos} is smaller than the {int(y.sum())} positives in labels")
    keep = d < np.inf
    order = np.argsort(d[keep], kind="stable")
    y = y[keep][order]
    tp = np.r_[0, np.cumsum(y)]
    fp = np.r_[0, np.cumsum(~y)]
    recall = tp / max(p, _SMALL)
    precision = np.maximum(tp, _SMALL) / np.maximum(tp + fp, _SMALL)
    return float(np.trapezoid(precision, recall))


def hpatches_verification_map(distances: np.ndarray, labels: np.ndarray) -> float:
    """Verification task: AP over a list of labelled pairs (``eval_verification``).

    The benchmark lists the negatives first, then the positives, and for its "imbalanced" AP keeps
    all negatives plus the first 20% of the positives; tied distances keep list order (so negatives
    rank before tied positives there). Build that list to reproduce it; mean over e/h/t and
    intra/inter negatives is the caller's.
    """
    return hpatches_ap(distances, labels)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


def hpatches_matching_map(desc_ref: np.ndarray, desc_target: np.ndarray, chunk: int = 4096) -> float:
    """Matching task for one sequence and one target image (``eval_matching``): patch i of the reference
    image and patch i of the target image are the same point; each reference patch is matched to its
    L2 nearest neighbour among the target's patches; AP over these N matches ranked by NN distance,
    a match correct iff NN index == i, with numpos = N (every patch should match). The benchmark
    reports the mean over sequences and target images (per e/h/t): that mean is the caller's.
    Argmin ties go to the lowest index, as ``np.argmin``.
    """
    ref = np.asarray(desc_ref, dtype=np.float64)
    tgt = np.asarray(desc_target, dtype=np.float64)
    if ref.ndim != 2 or tgt.ndim != 2 or ref.shape[1] != tgt.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) descriptors, got {ref.shape} and {tgt.shape}")
    n = len(ref)
    nn_idx = np.empty(n, dtype=np.int64)
    nn_d = np.empty(n)
    for s in range(0, n, chunk):
        sq = _sq_dists(ref[s : s + chunk], tgt)
        nn_idx[s : s + chunk] = sq.argmin(axis=1)
        nn_d[s : s + chunk] = np.sqrt(sq[np.arange(len(sq)), nn_idx[s : s + chunk]])
    return hpatches_ap(nn_d, nn_idx == np.arange(n), numpos=n)


def hpatches_retrieval_map(
    query_desc: np.ndarray,
    pool_desc: np.ndarray,
    positives_per_query: np.ndarray,
    query_groups: np.ndarray | None = None,
    pool_groups: np.ndarray | None = None,
    pool_size: int | None = None,
    chunk_elems: int = 1 << 23,
) -> float:
    """Retrieval task (``eval_retrieval``): mean over queries of the benchmark AP.

    For query i the ranked list is its K positives ``pool_desc[positives_per_query[i]]`` (in that
    order; the benchmark's 5 = the query's patch in the 5 target images of one type) followed by the
    other pool items in pool order, skipping those with ``pool_groups == query_groups[i]`` (the
    benchmark drops distractors from the query's own sequence), truncated to the first ``pool_size``
    items (the benchmark's "at rank" k in 100..20000); AP over that list by L2 distance to the query,
    stable sort, so a distractor tied with a positive ranks after it; numpos = the positives kept.

    Vectorised: the rank of each positive is counted directly (distractors strictly closer + positives
    before it), so no per-query sort; the AP is the trapezoid of ``hpatches_ap`` at those ranks.
    """
    q = np.asarray(query_desc, dtype=np.float64)
    pool = np.asarray(pool_desc, dtype=np.float64)
    pos = np.asarray(positives_per_query, dtype=np.int64)
    if q.ndim != 2 or pool.ndim != 2 or q.shape[1] != pool.shape[1] or pos.ndim != 2 or len(pos) != len(q):
        raise ValueError(f"expected (Q, D), (P, D), (Q, K); got {q.shape}, {pool.shape}, {pos.shape}")
    if (query_groups is None) != (pool_groups is None):
        raise ValueError("give both query_groups and pool_groups, or neither")
    n_q, k = pos.shape
    k_eff = k if pool_size is None else min(k, pool_size)
    n_dis = None if pool_size is None else pool_size - k_eff
    rows_per_chunk = max(1, chunk_elems // max(1, k_eff * len(pool)))
    aps = np.empty(n_q)
    for s in range(0, n_q, rows_per_chunk):
        sl = slice(s, s + rows_per_chunk)
        rows = np.arange(len(q[sl]))[:, None]
        dist = np.sqrt(_sq_dists(q[sl], pool))
        p_idx = pos[sl, :k_eff]
        d_pos = dist[rows, p_idx]  # (r, K)
        allowed = np.ones_like(dist, dtype=bool)
        allowed[rows, pos[sl]] = False
        if query_groups is not None:
            allowed &= np.asarray(pool_groups)[None, :] != np.asarray(query_groups)[sl, None]
        if n_dis is not None:
            allowed &= np.cumsum(allowed, axis=1) <= n_dis
        d_dis = np.where(allowed, dist, np.inf)
        closer_dis = (d_dis[:, None, :] < d_pos[:, :, None]).sum(axis=2)  # (r, K)
        j = np.arange(k_eff)
        before = (d_pos[:, None, :] < d_pos[:, :, None]) | ((d_pos[:, None, :] == d_pos[:, :, None]) & (j[None, :] < j[:, None])[None])
        ranks = np.sort(1 + closer_dis + before.sum(axis=2), axis=1).astype(np.float64)  # 1-based
        m = np.arange(1, k_eff + 1, dtype=np.float64)
        prev = np.maximum(m - 1, _SMALL) / np.maximum(ranks - 1, _SMALL)
        aps[sl] = ((prev + m / ranks) / 2.0).sum(axis=1) / max(k_eff, _SMALL)
    return float(aps.mean())
