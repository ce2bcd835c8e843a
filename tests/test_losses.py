"""The hardest-in-batch loss against a direct, loop-by-loop computation of its definition."""

import math

import torch

from pipeline.losses import hardest_in_batch_triplet_loss


def reference_hardnet_loss(a, p, margin, anchor_swap, guard=0.008):
    """Definition from Mishchuk et al. 2017 (HardNet), one pair at a time, plain Python floats."""
    n = len(a)
    d = [[math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a[i], p[j])) + 1e-6) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        candidates = [d[i][j] for j in range(n) if j != i and d[i][j] >= guard]
        if anchor_swap:
            candidates += [d[j][i] for j in range(n) if j != i and d[j][i] >= guard]
        hardest = min(candidates)
        total += max(0.0, margin + d[i][i] - hardest)
    return total / n


def test_matches_definition_with_and_without_anchor_swap():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=1)
    p = torch.nn.functional.normalize(a + 0.3 * torch.randn(9, 16, generator=g), dim=1)
    for swap in (False, True):
        for margin in (0.5, 1.0, 2.0):
            got = hardest_in_batch_triplet_loss(a, p, margin=margin, anchor_swap=swap).item()
            assert math.isclose(got, reference_hardnet_loss(a, p, margin, swap), rel_tol=1e-5, abs_tol=1e-6)


def test_duplicate_guard_ignores_near_identical_negatives():
    a = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    p = a.clone()
    p[0] = a[1]  # pair 0's positive equals anchor 1: distance ~0, must not count as a negative of row 1
    got = hardest_in_batch_triplet_loss(a, p, margin=1.0).item()
    assert math.isclose(got, reference_hardnet_loss(a, p, 1.0, True), rel_tol=1e-5)


def test_gradient_pulls_positives_together():
    a = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(2)), dim=1).requires_grad_()
    p = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    before = (a - p).norm(dim=1).mean().item()
    loss = hardest_in_batch_triplet_loss(a, p)
    loss.backward()
    with torch.no_grad():
        after = (a - 0.1 * a.grad - p).norm(dim=1).mean().item()
    assert after < before


# ---- the other losses, each against its formula computed pair by pair in plain Python ----------

import pytest  # noqa: E402

from pipeline.losses import (  # noqa: E402
    LOSSES,
    batch_loss,
    contrastive_loss,
    highest_scoring_negative_index,
    in_batch_negatives,
    random_other_index,
    second_order_similarity,
    softmax_pair_loss,
    triplet_random_negative_loss,
)


def _dist(x, y, eps=0.0):
    return math.sqrt(sum((float(u) - float(v)) ** 2 for u, v in zip(x, y)) + eps)


def test_random_other_index_never_picks_itself_and_covers_the_others():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5, 5)
    for _ in range(400):
        j = random_other_index(5, g)
        assert (j != torch.arange(5)).all()
        counts[torch.arange(5), j] += 1
    off = counts[~torch.eye(5, dtype=torch.bool)]
    assert off.min() > 60  # ~100 expected each: every other pair is drawn


def test_triplet_random_negative_matches_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g)
    p = a + 0.5 * torch.randn(7, 5, generator=g)
    for margin in (0.5, 1.0, 3.0):
        for swap in (False, True):
            got = triplet_random_negative_loss(a, p, margin, generator=torch.Generator().manual_seed(3), anchor_swap=swap).item()
            j = random_other_index(7, torch.Generator().manual_seed(3))  # the same draw
            total = 0.0
            for i in range(7):
                d_neg = _dist(a[i], p[j[i]], 1e-6)
                if swap:
                    d_neg = min(d_neg, _dist(p[i], p[j[i]], 1e-6))
                total += max(0.0, margin + _dist(a[i], p[i], 1e-6) - d_neg)
            assert math.isclose(got, total / 7, rel_tol=1e-5, abs_tol=1e-6)


def test_contrastive_matches_hadsell_chopra_lecun():
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    labels = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 1, 0])
    for margin in (0.5, 2.0, 4.0):
        expected = 0.0
        for i in range(10):
            d = _dist(x1[i], x2[i])
            expected += 0.5 * d * d if labels[i] == 1 else 0.5 * max(0.0, margin - d) ** 2
        got = contrastive_loss(x1, x2, labels, margin).item()
        assert math.isclose(got, expected / 10, rel_tol=1e-5)


def test_contrastive_gradient_is_finite_at_zero_distance():
    x = torch.randn(3, 4, requires_grad=True)
    contrastive_loss(x, x.detach().clone(), torch.tensor([1, 0, 0]), 1.0).backward()
    assert torch.isfinite(x.grad).all()


def test_softmax_pair_loss_is_cross_entropy():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5]])
    labels = torch.tensor([0, 1, 1])
    expected = sum(-math.log(math.exp(l[y]) / (math.exp(l[0]) + math.exp(l[1]))) for l, y in zip(logits.tolist(), labels.tolist())) / 3
    assert math.isclose(softmax_pair_loss(logits, labels).item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 10, 257])
def test_in_batch_negatives_is_a_derangement(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(20):
        perm = in_batch_negatives(n, g)
        assert sorted(perm.tolist()) == list(range(n))
        assert all(perm[i] != i for i in range(n))


def test_in_batch_negatives_is_uniform_over_derangements_of_3():
    g = torch.Generator().manual_seed(0)
    seen: dict[tuple, int] = {}
    for _ in range(600):
        key = tuple(in_batch_negatives(3, g).tolist())
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) == {(1, 2, 0), (2, 0, 1)} and min(seen.values()) > 240


def test_batch_loss_builds_balanced_pairs():
    g = torch.Generator().manual_seed(2)
    a, p = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    perm = in_batch_negatives(6, torch.Generator().manual_seed(5))
    labels = torch.cat([torch.ones(6), torch.zeros(6)])
    left, right = torch.cat([a, a]), torch.cat([p, p[perm]])
    got = batch_loss("contrastive", a, p, margin=2.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, contrastive_loss(left, right, labels, 2.0))
    score = lambda f1, f2: torch.stack([(f1 * f2).sum(1), -(f1 * f2).sum(1)], dim=1)  # noqa: E731
    got = batch_loss("softmax_ce", a, p, score=score, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, softmax_pair_loss(score(left, right), labels))
    torch.testing.assert_close(batch_loss("hardest_triplet", a, p, margin=0.7), hardest_in_batch_triplet_loss(a, p, margin=0.7))
    with pytest.raises(KeyError, match="hardest_triplet"):
        batch_loss("nope", a, p)
    assert set(LOSSES) == {"hardest_triplet", "triplet_random", "l2net_relative", "contrastive", "softmax_ce"}


def test_hardest_negatives_by_brute_force():
    """``negatives="hardest"``: each anchor's non-matching partner is, for the contrastive loss and
    TFeat's triplet, the nearest positive of another pair (near-duplicates excluded), for the pair classifier the other
    positive it scores most like a match (plain loops over the batch)."""
    g = torch.Generator().manual_seed(8)
    a, p = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    p[4] = a[2]  # a duplicate of anchor 2's point under another pair: not a negative for it
    want = []
    for i in range(7):
        dists = [(_dist(a[i], p[j], 1e-6), j) for j in range(7) if j != i and _dist(a[i], p[j], 1e-6) >= 0.008]
        want.append(min(dists)[1])
    assert want[2] != 4
    labels = torch.cat([torch.ones(7), torch.zeros(7)])
    left, right = torch.cat([a, a]), torch.cat([p, p[want]])
    got = batch_loss("contrastive", a, p, margin=3.0, negatives="hardest")
    torch.testing.assert_close(got, contrastive_loss(left, right, labels, 3.0))
    # TFeat's triplet with the same partner, its swap included
    for swap in (False, True):
        total = 0.0
        for i in range(7):
            d_neg = _dist(a[i], p[want[i]], 1e-6)
            if swap:
                d_neg = min(d_neg, _dist(p[i], p[want[i]], 1e-6))
            total += max(0.0, 3.0 + _dist(a[i], p[i], 1e-6) - d_neg)
        got = batch_loss("triplet_random", a, p, margin=3.0, anchor_swap=swap, negatives="hardest").item()
        assert math.isclose(got, total / 7, rel_tol=1e-5, abs_tol=1e-6)
    # the pair classifier: the partner its own score finds most match-like (all 6 others are candidates)
    score = lambda f1, f2: torch.stack([-(f1 * f2).sum(1), (f1 * f2).sum(1) - f1[:, 0]], dim=1)  # noqa: E731
    best = [max((j for j in range(7) if j != i), key=lambda j: float((a[i] * p[j]).sum() * 2 - a[i, 0])) for i in range(7)]
    assert best != want  # the score's choice is not the distance's: the classifier's own opinion is used
    got = batch_loss("softmax_ce", a, p, score=score, negatives="hardest", generator=torch.Generator().manual_seed(1))
    right = torch.cat([p, p[best]])
    torch.testing.assert_close(got, softmax_pair_loss(score(left, right), labels))
    # a batch larger than the 16 candidates: never itself, and not one fixed partner for every row
    big_a, big_p = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g)
    idx = highest_scoring_negative_index(big_a, big_p, score, generator=torch.Generator().manual_seed(2))
    assert (idx != torch.arange(40)).all() and len(set(idx.tolist())) > 1
    # without duplicates, the hardest partner costs at least as much as a random one, for every draw
    a, p = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    for seed in range(5):
        rnd = batch_loss("contrastive", a, p, margin=3.0, generator=torch.Generator().manual_seed(seed))
        assert batch_loss("contrastive", a, p, margin=3.0, negatives="hardest") >= rnd
    for name in ("contrastive", "triplet_random"):
        with pytest.raises(ValueError, match="random.*hardest"):
            batch_loss(name, a, p, negatives="closest")


def test_mixed_negatives_average_the_random_and_the_hardest_loss():
    """``negatives="mixed"``: each matching pair twice, one random and one hard non-matching pair each;
    both halves balanced, so the loss is the mean of the random-negative and the hardest-negative
    losses (the same random draw; with 7 pairs the classifier's 16 candidates are all 6 others)."""
    g = torch.Generator().manual_seed(11)
    a, p = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    score = lambda f1, f2: torch.stack([-(f1 * f2).sum(1), (f1 * f2).sum(1) - f1[:, 0]], dim=1)  # noqa: E731
    for name in ("contrastive", "softmax_ce"):
        for seed in range(3):
            kw = dict(margin=2.0, score=score)
            mixed = batch_loss(name, a, p, negatives="mixed", generator=torch.Generator().manual_seed(seed), **kw)
            rnd = batch_loss(name, a, p, negatives="random", generator=torch.Generator().manual_seed(seed), **kw)
            hard = batch_loss(name, a, p, negatives="hardest", generator=torch.Generator().manual_seed(seed), **kw)
            torch.testing.assert_close(mixed, (rnd + hard) / 2)
    with pytest.raises(ValueError, match="pair losses"):
        batch_loss("triplet_random", a, p, negatives="mixed")


def test_nearest_candidates_are_the_closest_features_and_the_classifier_picks_among_them():
    """``pool="nearest"``: for each pair, the 16 in-batch partners whose features are closest (brute
    force over the batch, never itself), and of those the one the classifier's score finds most
    match-like; through ``batch_loss`` with ``hard_candidates``, the same partners."""
    g = torch.Generator().manual_seed(13)
    a, p = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g)
    score = lambda f1, f2: torch.stack([-(f1 * f2).sum(1), (f1 * f2).sum(1) - f1[:, 0] * f2[:, 1]], dim=1)  # noqa: E731
    got = highest_scoring_negative_index(a, p, score, pool="nearest")
    for i in range(40):
        dist = [(float(((a[i] - p[j]) ** 2).sum()), j) for j in range(40) if j != i]
        pool = [j for _, j in sorted(dist)[:16]]
        margin = {j: float(torch.diff(score(a[i : i + 1], p[j : j + 1]))[0, 0]) for j in pool}
        assert int(got[i]) == max(pool, key=margin.get)
    # a partner outside the 16 nearest is never chosen, however match-like the score finds it: with a
    # score that calls the farther partner the likelier match, the choice is each row's 16th nearest
    farther = lambda f1, f2: torch.stack([torch.zeros(len(f1)), (f1 - f2).norm(dim=1)], dim=1)  # noqa: E731
    ranked = torch.cdist(a, p).masked_fill(torch.eye(40, dtype=torch.bool), float("inf")).argsort(dim=1)
    assert torch.equal(highest_scoring_negative_index(a, p, farther, pool="nearest"), ranked[:, 15])
    left, labels = torch.cat([a] * 2), torch.cat([torch.ones(40), torch.zeros(40)])
    torch.testing.assert_close(batch_loss("softmax_ce", a, p, score=score, negatives="hardest", hard_candidates="nearest"),
                               softmax_pair_loss(score(left, torch.cat([p, p[got]])), labels))
    with pytest.raises(ValueError, match="random.*nearest"):
        highest_scoring_negative_index(a, p, score, pool="farthest")


def test_batch_loss_passes_tfeat_anchor_swap_to_the_random_triplet():
    """``loss.anchor_swap`` reaches the random-negative triplet (TFeat's swap), on the same draw."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(9, 6, generator=g)
    p = 0.5 * a + 0.1 * torch.randn(9, 6, generator=g)  # positives closer to each other than to the anchors
    for swap in (False, True):
        got = batch_loss("triplet_random", a, p, margin=2.0, anchor_swap=swap, generator=torch.Generator().manual_seed(11))
        want = triplet_random_negative_loss(a, p, 2.0, generator=torch.Generator().manual_seed(11), anchor_swap=swap)
        torch.testing.assert_close(got, want)
    no_swap = batch_loss("triplet_random", a, p, margin=2.0, anchor_swap=False, generator=torch.Generator().manual_seed(11))
    swap = batch_loss("triplet_random", a, p, margin=2.0, anchor_swap=True, generator=torch.Generator().manual_seed(11))
    assert swap > no_swap  # the swap picks the closer negative: here the positive-negative distance


def test_l2net_relative_loss_matches_the_papers_formula():
    """E1 of Tian et al. 2017: S = exp(2 - D), column- and row-normalised, -1/2 (log s^c_ii + log s^r_ii),
    here averaged over the n pairs; computed entry by entry in plain Python."""
    from pipeline.losses import l2net_relative_loss

    g = torch.Generator().manual_seed(6)
    a = torch.nn.functional.normalize(torch.randn(7, 12, generator=g), dim=1)
    p = torch.nn.functional.normalize(a + 0.4 * torch.randn(7, 12, generator=g), dim=1)
    n = len(a)

    def e1(scale: float = 1.0, margin: float = 0.0) -> float:
        """S_ij = exp(scale (2 - D_ij - margin [i == j])), then the column- and row-normalised mean."""
        s = [[math.exp(scale * (2.0 - _dist(a[i], p[j], 1e-6) - (margin if i == j else 0.0))) for j in range(n)]
             for i in range(n)]
        total = 0.0
        for i in range(n):
            col = s[i][i] / sum(s[q][i] for q in range(n))
            row = s[i][i] / sum(s[i][q] for q in range(n))
            total += -0.5 * (math.log(col) + math.log(row))
        return total / n

    assert math.isclose(l2net_relative_loss(a, p).item(), e1(), rel_tol=1e-5)
    torch.testing.assert_close(batch_loss("l2net_relative", a, p), l2net_relative_loss(a, p))
    # matching pairs closer than every negative lower it; swapping the positives around raises it
    assert l2net_relative_loss(a, a).item() < l2net_relative_loss(a, p).item() < l2net_relative_loss(a, p.roll(1, 0)).item()
    # scale k: the same formula with exp(k * (2 - D)), through batch_loss as configs pass it
    k = 9.0
    assert math.isclose(batch_loss("l2net_relative", a, p, scale=k).item(), e1(k), rel_tol=1e-5)
    # relative_margin m: each positive distance + m inside the softmax (additive margin; 0 = the paper's)
    assert math.isclose(batch_loss("l2net_relative", a, p, scale=k, relative_margin=0.5).item(), e1(k, 0.5), rel_tol=1e-5)
    assert e1(k, 0.5) > e1(k)


def test_second_order_similarity_matches_the_sosnet_formula_by_brute_force():
    """R_SOS = 1/N sum_i sqrt(sum_{j in c_i} (d(x_i, x_j) - d(x+_i, x+_j))^2), c_i the union of x_i's K
    nearest anchors and x+_i's K nearest positives (Tian et al. 2019, eqs. 5-6), by plain loops."""
    g = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(12, 6, generator=g), dim=1)
    p = torch.nn.functional.normalize(a + 0.3 * torch.randn(12, 6, generator=g), dim=1)
    k = 3
    total = 0.0
    for i in range(12):
        near_a = sorted((j for j in range(12) if j != i), key=lambda j: _dist(a[i], a[j]))[:k]
        near_p = sorted((j for j in range(12) if j != i), key=lambda j: _dist(p[i], p[j]))[:k]
        total += math.sqrt(sum((_dist(a[i], a[j]) - _dist(p[i], p[j])) ** 2 for j in set(near_a) | set(near_p)))
    got = second_order_similarity(a, p, knn=k)
    assert got.item() == pytest.approx(total / 12, abs=1e-4)  # pairwise_l2's eps shifts distances by ~1e-6
    assert second_order_similarity(a, a.clone(), knn=k).item() == pytest.approx(0.0, abs=1e-5)  # same geometry: 0
    leaf = a.clone().requires_grad_()
    second_order_similarity(leaf, p, knn=k).backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="more than 3 pairs"):
        second_order_similarity(a[:3], p[:3], knn=3)


def test_the_objective_adds_the_weighted_second_order_term():
    """``loss.sos_weight`` adds w * R_SOS of the batch's descriptors to the first-order loss."""
    from pipeline.config import LossConfig
    from pipeline.models import create_model
    from pipeline.objectives import PairObjective

    model = create_model("sosnet").eval()  # eval: no dropout, the same descriptors in every forward
    x = torch.rand(2 * 12, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        desc = model(x).view(12, 2, -1)
        plain = PairObjective(model, "sosnet", LossConfig())(x)
        with_sos = PairObjective(model, "sosnet", LossConfig(sos_weight=0.5, sos_knn=4))(x)
    torch.testing.assert_close(plain, hardest_in_batch_triplet_loss(desc[:, 0], desc[:, 1]))
    torch.testing.assert_close(with_sos, plain + 0.5 * second_order_similarity(desc[:, 0], desc[:, 1], knn=4))


def test_descriptor_correlation_penalty_matches_numpy_corrcoef():
    """L2-Net's E2: the mean over i != j of the squared correlation of descriptor dimensions i and j
    across the batch, per view, averaged over the two views; numpy's corrcoef as the reference."""
    import numpy as np

    from pipeline.losses import descriptor_correlation_penalty

    g = torch.Generator().manual_seed(3)
    a, p = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    p[:, 1] = 2 * p[:, 0] + 0.1 * p[:, 1]  # two nearly redundant dimensions in one view
    off = ~np.eye(6, dtype=bool)
    want = 0.5 * sum((np.corrcoef(v.numpy(), rowvar=False)[off] ** 2).mean() for v in (a, p))
    assert descriptor_correlation_penalty(a, p).item() == pytest.approx(want, rel=1e-6)
    assert descriptor_correlation_penalty(p, p).item() > descriptor_correlation_penalty(a, a).item()
    leaf = p.clone().requires_grad_()
    descriptor_correlation_penalty(a, leaf).backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        descriptor_correlation_penalty(a[:, :1], p[:, :1])


def test_the_objective_passes_the_relative_margin_and_adds_the_weighted_compactness_term():
    from pipeline.config import LossConfig
    from pipeline.losses import descriptor_correlation_penalty, l2net_relative_loss
    from pipeline.models import create_model
    from pipeline.objectives import PairObjective

    model = create_model("l2net").eval()
    x = torch.rand(2 * 12, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        desc = model(x).view(12, 2, -1)
        got = PairObjective(model, "l2net", LossConfig(scale=10.0, relative_margin=0.5, compactness_weight=3.0))(x)
    want = (l2net_relative_loss(desc[:, 0], desc[:, 1], scale=10.0, margin=0.5)
            + 3.0 * descriptor_correlation_penalty(desc[:, 0], desc[:, 1]))
    torch.testing.assert_close(got, want)
