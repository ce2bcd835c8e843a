"""FPR95 against brute force over every threshold, HardNet's reference code and sklearn's ROC; ROC AUC and
AP (sklearn inside) against brute force and closed forms; the HPatches AP against the benchmark's code."""

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


# ---- ROC AUC and AP (scikit-learn's inside) against brute force and closed forms ----------------

import itertools  # noqa: E402
import math  # noqa: E402

from pipeline.metrics import (  # noqa: E402
    average_precision,
    hpatches_ap,
    hpatches_matching_map,
    hpatches_retrieval_map,
    hpatches_verification_map,
    roc_auc,
)


def _tied_sample(seed, n=None):
    rng = np.random.default_rng(seed)
    n = n or int(rng.integers(10, 400))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    d = rng.integers(0, 8, n).astype(float) - 1.5 * labels * rng.random(n).round(1)  # many ties
    return d, labels


def brute_force_auc(d, labels):
    """P(d_pos < d_neg) + P(d_pos == d_neg) / 2 over every (positive, negative) pair."""
    pos, neg = d[labels == 1], d[labels == 0]
    wins = sum(1.0 if p < q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_force_ap(d, labels):
    """Every distinct distance t in turn as the threshold (predict a match iff d <= t): precision and
    recall there; AP = sum over thresholds of (recall gained) x precision."""
    n_pos, ap, prev_recall = (labels == 1).sum(), 0.0, 0.0
    for t in sorted(set(d.tolist())):
        chosen = d <= t
        tp = (chosen & (labels == 1)).sum()
        recall, precision = tp / n_pos, tp / chosen.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(15))
def test_roc_auc_and_ap_match_brute_force_with_ties(seed):
    d, labels = _tied_sample(seed)
    assert roc_auc(d, labels) == pytest.approx(brute_force_auc(d, labels), abs=1e-12)
    assert average_precision(d, labels) == pytest.approx(brute_force_ap(d, labels), abs=1e-12)


def test_auc_ap_hand_computed():
    # distances 1, 2, 3, 4 with labels 1, 0, 1, 0: AUC = P(d_pos < d_neg) = (2 + 1) / 4
    d, labels = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 0, 1, 0])
    assert roc_auc(d, labels) == pytest.approx(0.75)
    assert average_precision(d, labels) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    # a tie between a positive and a negative: both enter together at precision 1/2
    assert average_precision(np.array([1.0, 1.0]), np.array([1, 0])) == pytest.approx(0.5)
    assert roc_auc(np.array([1.0, 1.0]), np.array([1, 0])) == pytest.approx(0.5)


def test_a_million_pairs_against_closed_forms():
    """Positives at U(0, 1), negatives at U(0.3, 1.3), as many of each: AUC = P(X < Y + 0.3) =
    1 - 0.7^2 / 2; at 95% recall the threshold is 0.95, so FPR95 = 0.65; precision at recall r is
    r / (r + max(0, r - 0.3)), so AP = 0.3 + [r/2 + 0.075 ln(2r - 0.3)] from 0.3 to 1 (the HPatches
    trapezoid too, on this many pairs)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1_000_000)
    d = rng.random(1_000_000) + 0.3 * (1 - labels)
    ap = 0.3 + 0.35 + 0.075 * (math.log(1.7) - math.log(0.3))
    assert roc_auc(d, labels) == pytest.approx(1 - 0.7**2 / 2, abs=2e-3)
    assert fpr_at_95_recall(d, labels) == pytest.approx(0.65, abs=3e-3)
    assert average_precision(d, labels) == pytest.approx(ap, abs=3e-3)
    assert hpatches_verification_map(d, labels) == pytest.approx(ap, abs=3e-3)


# ---- HPatches, against a loop-by-loop reading of hpatches-benchmark's python/utils ---------------


def reference_pr_ap(scores, labels, numpos=None):
    """hpatches-benchmark ``metrics.pr(scores, labels, numpos)[2]``, written out as loops: stable sort by
    descending score, precision/recall after each item, start at (0, 1), trapezoid rule."""
    p = int(sum(labels)) if numpos is None else numpos
    items = sorted(((s, l) for s, l in zip(scores, labels) if s > -np.inf), key=lambda t: -t[0])  # sorted() is stable
    tp = fp = 0
    prev_r, prev_p, area = 0.0, 1.0, 0.0
    for _, l in items:
        tp, fp = tp + (l == 1), fp + (l == 0)
        r, pr = tp / max(p, 1e-10), max(tp, 1e-10) / max(tp + fp, 1e-10)
        area += (r - prev_r) * (pr + prev_p) / 2.0
        prev_r, prev_p = r, pr
    return area


@pytest.mark.parametrize("seed", range(8))
def test_hpatches_ap_matches_reference(seed):
    d, labels = _tied_sample(200 + seed, 150)
    assert hpatches_ap(d, labels) == pytest.approx(reference_pr_ap(-d, labels))
    assert hpatches_ap(d, labels, numpos=int(labels.sum()) + 7) == pytest.approx(reference_pr_ap(-d, labels, int(labels.sum()) + 7))
    assert hpatches_verification_map(d, labels) == pytest.approx(reference_pr_ap(-d, labels))


def test_hpatches_ap_hand_computed():
    # ranked: pos, neg, pos. points (0,1) (1/2,1) (1/2,1/2) (1,2/3): area = 1/2 + 0 + 1/2 * (1/2 + 2/3) / 2
    d, labels = np.array([1.0, 2.0, 3.0]), np.array([1, 0, 1])
    assert hpatches_ap(d, labels) == pytest.approx(0.5 + 0.5 * (0.5 + 2 / 3) / 2)


@pytest.mark.parametrize("seed", range(5))
def test_hpatches_matching_matches_reference(seed):
    rng = np.random.default_rng(300 + seed)
    ref = rng.normal(size=(60, 8))
    tgt = ref + rng.normal(scale=0.6, size=ref.shape)
    # eval_matching: D = cdist(ref, tgt); idx = argmin(D, 1); labels = idx == arange; AP of -D[gt, idx], numpos = N
    D = np.sqrt(((ref[:, None, :] - tgt[None, :, :]) ** 2).sum(-1))
    idx = D.argmin(axis=1)
    labels = idx == np.arange(60)
    assert 0 < labels.sum() < 60
    expected = reference_pr_ap(-D[np.arange(60), idx], labels, numpos=60)
    assert hpatches_matching_map(ref, tgt) == pytest.approx(expected)
    assert hpatches_matching_map(ref, tgt, chunk=7) == pytest.approx(expected)


def reference_retrieval(queries, pool, positives, q_groups, p_groups, pool_size):
    """eval_retrieval for one type: per query, [its positives] + [pool items of other groups, in pool
    order], first ``pool_size`` of them, AP of -distance; mean over queries."""
    aps = []
    for i, q in enumerate(queries):
        pos = list(positives[i])
        d_list = [np.linalg.norm(q - pool[j]) for j in pos]
        d_list += [np.linalg.norm(q - pool[j]) for j in range(len(pool)) if j not in pos and p_groups[j] != q_groups[i]]
        gt = [1] * len(pos) + [0] * (len(d_list) - len(pos))
        k = len(d_list) if pool_size is None else pool_size
        aps.append(reference_pr_ap(-np.array(d_list[:k]), gt[:k]))
    return float(np.mean(aps))


@pytest.mark.parametrize("pool_size", [None, 3, 12, 40])
def test_hpatches_retrieval_matches_reference(pool_size):
    rng = np.random.default_rng(7)
    n_q, k, n_pool, dim = 9, 5, 70, 6
    queries = rng.normal(size=(n_q, dim))
    pool = rng.normal(size=(n_pool, dim))
    positives = np.stack([rng.choice(n_pool, k, replace=False) for _ in range(n_q)])
    for i in range(n_q):  # positives close to their query, at varying noise
        pool[positives[i]] = queries[i] + rng.normal(scale=rng.uniform(0.3, 1.5), size=(k, dim))
    pool[positives[0, 1]] = pool[positives[0, 0]]  # a tie between two positives
    q_groups, p_groups = rng.integers(0, 4, n_q), rng.integers(0, 4, n_pool)
    expected = reference_retrieval(queries, pool, positives, q_groups, p_groups, pool_size)
    assert hpatches_retrieval_map(queries, pool, positives, q_groups, p_groups, pool_size) == pytest.approx(expected)
    assert hpatches_retrieval_map(queries, pool, positives, q_groups, p_groups, pool_size, chunk_elems=1) == pytest.approx(expected)
    no_groups = reference_retrieval(queries, pool, positives, np.zeros(n_q), np.ones(n_pool), pool_size)
    assert hpatches_retrieval_map(queries, pool, positives, pool_size=pool_size) == pytest.approx(no_groups)


def test_hpatches_retrieval_ties_favour_positives():
    # The benchmark lists positives before distractors and sorts stably: a distractor at the same
    # distance as a positive ranks after it.
    query = np.zeros((1, 2))
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])  # distractor at 1, positive at 1, distractor at 3
    assert hpatches_retrieval_map(query, pool, np.array([[1]])) == pytest.approx(1.0)
    assert hpatches_retrieval_map(query, pool, np.array([[2]])) == pytest.approx(reference_pr_ap(-np.array([3.0, 1.0, 1.0]), [1, 0, 0]))


def test_hpatches_retrieval_perfect():
    queries = np.eye(4)
    pool = np.concatenate([np.repeat(queries, 2, axis=0), -np.eye(4) * 5])  # 2 exact positives each, far distractors
    positives = np.arange(8).reshape(4, 2)
    assert hpatches_retrieval_map(queries, pool, positives) == pytest.approx(1.0)


def shared_difficulty_pairs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two models' distances on the same pairs: most of each distance is the pair's own difficulty, which
    both models see; model a separates the classes by 3.4, model b by 3.28 (FPR95 about 0.04 and 0.05)."""
    labels = rng.random(n) < 0.5
    difficulty = rng.normal(0, 1, n)
    d_a = difficulty + 0.25 * rng.normal(0, 1, n) - 3.4 * labels
    d_b = difficulty + 0.25 * rng.normal(0, 1, n) - 3.28 * labels
    return d_a, d_b, labels


def test_paired_difference_tells_models_apart_where_two_intervals_overlap_and_covers_the_population_difference():
    from pipeline.metrics import bootstrap_interval, paired_bootstrap_difference

    d_a, d_b, labels = shared_difficulty_pairs(4000, np.random.default_rng(0))
    point, low, high = paired_bootstrap_difference(d_a, d_b, labels, fpr_at_95_recall)
    assert point == pytest.approx(fpr_at_95_recall(d_a, labels) - fpr_at_95_recall(d_b, labels), abs=1e-15)
    # a's own interval reaches past b's point estimate; the paired interval says a is better.
    assert bootstrap_interval(d_a, labels, fpr_at_95_recall)[1] > fpr_at_95_recall(d_b, labels)
    assert low < point < high < 0
    # The difference over two million fresh pairs of the same kind lies inside the interval.
    big_a, big_b, big_labels = shared_difficulty_pairs(2_000_000, np.random.default_rng(1))
    assert low < fpr_at_95_recall(big_a, big_labels) - fpr_at_95_recall(big_b, big_labels) < high
    # Antisymmetric; a model against itself differs by nothing.
    assert paired_bootstrap_difference(d_b, d_a, labels, fpr_at_95_recall) == pytest.approx((-point, -high, -low))
    assert paired_bootstrap_difference(d_a, d_a, labels, fpr_at_95_recall) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_difference(d_a, d_b[:-1], labels, fpr_at_95_recall)


def test_bootstrap_fpr95_from_counts_over_one_sort_equals_rescoring_every_resample():
    """The FPR95 fast path (pairs sorted once, each resample as counts per pair) against brute force over
    every threshold of each resample ``(distances[idx], labels[idx])``, ties and unequal classes included."""
    from pipeline.metrics import bootstrap_interval, paired_bootstrap_difference

    def rescored(d, y):  # not fpr_at_95_recall itself, so the generic path rescores every resample
        return float(brute_force_fpr95(d, y.astype(int)))

    rng = np.random.default_rng(5)
    labels = rng.random(3000) < 0.3
    d_a = np.round(rng.normal(0, 1, 3000) - 1.5 * labels, 1)  # rounded: many ties at the threshold
    d_b = np.round(rng.normal(0, 1, 3000) - 1.2 * labels, 1)
    assert bootstrap_interval(d_a, labels, fpr_at_95_recall, n=300) == bootstrap_interval(d_a, labels, rescored, n=300)
    assert (paired_bootstrap_difference(d_a, d_b, labels, fpr_at_95_recall, n=300)
            == paired_bootstrap_difference(d_a, d_b, labels, rescored, n=300))
    # The interval covers FPR95 over a million fresh pairs of the same kind.
    big_labels = rng.random(1_000_000) < 0.3
    big_a = np.round(rng.normal(0, 1, 1_000_000) - 1.5 * big_labels, 1)
    low, high = bootstrap_interval(d_a, labels, fpr_at_95_recall)
    assert low < fpr_at_95_recall(big_a, big_labels) < high
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_interval(d_a[:-1], labels, fpr_at_95_recall)
