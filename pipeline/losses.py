"""Losses for descriptor learning."""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch

# The margin of every margin loss unless a config says otherwise (HardNet's, TFeat's and the
# contrastive loss's usual 1.0); ``pipeline.config.LossConfig.margin`` defaults to it too.
DEFAULT_MARGIN = 1.0


def pairwise_l2(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) Euclidean distances; ``eps`` keeps the sqrt differentiable at 0."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * a @ b.t()
    return torch.sqrt(sq.clamp_min(0.0) + eps)


def hardest_in_batch_triplet_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    margin: float = DEFAULT_MARGIN,
    anchor_swap: bool = True,
    duplicate_guard: float = 0.008,
) -> torch.Tensor:
    """HardNet's loss (Mishchuk et al. 2017, ``loss_HardNet`` with ``batch_reduce='min'``).

    Row i of ``anchor`` and ``positive`` describe the same point; every other row of the batch is a
    negative. For each pair, the hardest negative is the closest non-matching descriptor in its row
    (and, with ``anchor_swap``, its column). Distances below ``duplicate_guard`` off the diagonal
    are treated as duplicates of the same point, not negatives.
    Loss = mean_i max(0, margin + d(a_i, p_i) - min_neg_i).
    """
    if anchor.shape != positive.shape or anchor.ndim != 2:
        raise ValueError(f"anchor and positive must be (B, D) of equal shape, got {anchor.shape} and {positive.shape}")
    if anchor.shape[0] < 2:
        raise ValueError("hardest-in-batch mining needs a batch of at least 2 pairs")
    dist = pairwise_l2(anchor, positive)
    pos = dist.diagonal()
    # Push the diagonal and near-duplicates out of reach of the min (the reference adds 10).
    excluded = torch.eye(len(dist), dtype=torch.bool, device=dist.device) | (dist < duplicate_guard)
    neg = dist + 10.0 * excluded
    min_neg = neg.min(dim=1).values
    if anchor_swap:
        min_neg = torch.minimum(min_neg, neg.min(dim=0).values)
    return torch.clamp(margin + pos - min_neg, min=0.0).mean()


def _row_l2(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Row-wise Euclidean distance, with ``pairwise_l2``'s ``eps`` so the two losses agree."""
    return torch.sqrt(((a - b) ** 2).sum(1) + eps)


def _check_pairs(anchor: torch.Tensor, positive: torch.Tensor) -> None:
    if anchor.shape != positive.shape or anchor.ndim != 2:
        raise ValueError(f"anchor and positive must be (B, D) of equal shape, got {tuple(anchor.shape)} and {tuple(positive.shape)}")
    if anchor.shape[0] < 2:
        raise ValueError("in-batch negatives need a batch of at least 2 pairs")


def random_other_index(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each i in [0, n), an index j != i drawn uniformly from the n - 1 others (CPU LongTensor)."""
    if n < 2:
        raise ValueError(f"need at least 2 items to pick another one, got {n}")
    return (torch.arange(n) + torch.randint(1, n, (n,), generator=generator)) % n


def in_batch_negatives(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random derangement pi of [0, n) (CPU LongTensor): ``(a_i, p_pi(i))`` are non-matching
    pairs made from a batch of n matching pairs, each positive used exactly once.

    Rejection sampling of random permutations: a permutation is a derangement with probability ~1/e,
    so this takes e tries on average, each O(n).
    """
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == torch.arange(n)).any()):
            return perm


Negatives = Literal["random", "hardest", "mixed"]
# The losses on (pair, match-or-not) examples: the only ones that can take both kinds of negative
# for every pair ("mixed"); a triplet has one negative slot.
PAIR_LOSSES = ("contrastive", "softmax_ce")


def _check_negatives(negatives: str, name: str) -> None:
    if negatives not in get_args(Negatives):
        raise ValueError(f"negatives must be 'random', 'hardest' or 'mixed', got {negatives!r}")
    if negatives == "mixed" and name not in PAIR_LOSSES:
        raise ValueError(f"negatives 'mixed' is for the pair losses ({', '.join(PAIR_LOSSES)}), not {name}")


def hardest_negative_index(anchor: torch.Tensor, positive: torch.Tensor, duplicate_guard: float = 0.008) -> torch.Tensor:
    """For each i, the j != i whose ``positive[j]`` is closest to ``anchor[i]`` (HardNet's mining, as
    non-matching pairs for the pair losses); distances below ``duplicate_guard`` are duplicates of the
    same point, as in ``hardest_in_batch_triplet_loss``. No gradient flows through the choice."""
    with torch.no_grad():
        dist = pairwise_l2(anchor.float(), positive.float())
        excluded = torch.eye(len(dist), dtype=torch.bool, device=dist.device) | (dist < duplicate_guard)
        return dist.masked_fill(excluded, float("inf")).argmin(dim=1)


HardCandidates = Literal["random", "nearest"]


def highest_scoring_negative_index(anchor: torch.Tensor, positive: torch.Tensor,
                                   score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                   candidates: int = 16, generator: torch.Generator | None = None,
                                   pool: HardCandidates = "random") -> torch.Tensor:
    """A pair classifier's hard negatives: for each i, among ``candidates`` j != i, the one whose
    pair ``(anchor[i], positive[j])`` the classifier ``score`` finds most like a match (largest
    ``logit_match - logit_nonmatch``). Scoring all B^2 pairs would cost B times a step's metric
    network, so only ``candidates`` are scored: ``pool="random"`` draws them at random (the best of 16
    ranks, on average, among the hardest 1/17 of the batch); ``pool="nearest"`` takes the j whose
    ``positive[j]`` features are closest to ``anchor[i]``'s, so the whole batch is searched at the cost
    of one B x B distance matrix (what HardNet's mining looks at, then the classifier's own choice).
    No gradient flows through the choice."""
    b = len(anchor)
    k = min(candidates, b - 1)
    if pool == "nearest":
        with torch.no_grad():
            dist = pairwise_l2(anchor.float(), positive.float())
            dist.fill_diagonal_(float("inf"))
            others = dist.topk(k, dim=1, largest=False).indices
    elif pool == "random":
        # k distinct others per row: shifts 1..b-1 without repetition (a random order of them), then mod b
        shifts = torch.rand(b, b - 1, generator=generator).argsort(dim=1)[:, :k] + 1
        others = ((torch.arange(b).unsqueeze(1) + shifts) % b).to(anchor.device)
    else:
        raise ValueError(f"pool must be 'random' or 'nearest', got {pool!r}")
    with torch.no_grad():
        logits = score(anchor.repeat_interleave(k, dim=0), positive[others.reshape(-1)]).float()
        margin = (logits[:, 1] - logits[:, 0]).view(b, k)
    return others.gather(1, margin.argmax(dim=1, keepdim=True)).squeeze(1)


def triplet_random_negative_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    margin: float = DEFAULT_MARGIN,
    generator: torch.Generator | None = None,
    anchor_swap: bool = False,
    negatives: Literal["random", "hardest"] = "random",
) -> torch.Tensor:
    """Triplet margin loss with one in-batch negative per pair (TFeat).

    For pair i the negative is ``positive[j]`` for a uniformly random j != i (``random_other_index``),
    or with ``negatives="hardest"`` the closest one (``hardest_negative_index``).
    Loss = mean_i max(0, margin + d(a_i, p_i) - d(a_i, n_i)); with ``anchor_swap`` (TFeat's variant)
    the negative distance is min(d(a_i, n_i), d(p_i, n_i)).
    """
    _check_pairs(anchor, positive)
    _check_negatives(negatives, "triplet_random")
    if negatives == "hardest":
        index = hardest_negative_index(anchor, positive)
    else:
        index = random_other_index(len(anchor), generator).to(positive.device)
    negative = positive[index]
    d_neg = _row_l2(anchor, negative)
    if anchor_swap:
        d_neg = torch.minimum(d_neg, _row_l2(positive, negative))
    return torch.clamp(margin + _row_l2(anchor, positive) - d_neg, min=0.0).mean()


def contrastive_loss(d1: torch.Tensor, d2: torch.Tensor, labels: torch.Tensor, margin: float = DEFAULT_MARGIN) -> torch.Tensor:
    """Contrastive loss (Hadsell, Chopra, LeCun 2006) on descriptor pairs ``(d1[i], d2[i])``.

    With d the Euclidean distance: label 1 (similar) costs d^2 / 2, label 0 (dissimilar) costs
    max(0, margin - d)^2 / 2; mean over pairs. Works on raw (unnormalised) descriptors.
    """
    if d1.shape != d2.shape or d1.ndim != 2 or labels.shape != (d1.shape[0],):
        raise ValueError(f"expected (B, D), (B, D), (B,), got {tuple(d1.shape)}, {tuple(d2.shape)}, {tuple(labels.shape)}")
    sq = ((d1 - d2) ** 2).sum(1)
    # The similar term uses d^2 directly (no sqrt); the tiny eps keeps sqrt's gradient finite at d = 0.
    d = torch.sqrt(sq + 1e-12)
    y = labels.to(sq.dtype)
    return (0.5 * y * sq + 0.5 * (1.0 - y) * torch.clamp(margin - d, min=0.0) ** 2).mean()


def l2net_relative_loss(anchor: torch.Tensor, positive: torch.Tensor, scale: float = 1.0, margin: float = 0.0) -> torch.Tensor:
    """L2-Net's relative-distance loss (Tian, Fan, Wu 2017, E1), averaged over pairs instead of summed.

    With D the (B, B) Euclidean distances between ``anchor`` and ``positive`` rows and S = exp(2 - D):
    s^r_ij = s_ij / sum_k s_ik (row-wise), s^c_ij = s_ij / sum_k s_kj (column-wise);
    loss = -1/2 mean_i (log s^r_ii + log s^c_ii). Every in-batch negative counts, weighted by how close
    it is (a softened hardest-in-batch); 2 is the largest distance between unit descriptors. L2-Net's
    compactness term (E2) is ``descriptor_correlation_penalty`` (``loss.compactness_weight``); its
    intermediate-map term (E3) is not included.

    ``scale`` multiplies the exponent, S = exp(scale * (2 - D)); 1 is the paper's formula. With unit
    descriptors the exponent spans only [0, 2], so at scale 1 a batch of 128 spreads the softmax over
    all negatives almost evenly (the positive gets ~3 % of it at best) and the gradient barely
    singles out the hard ones; a larger scale (a lower temperature) moves it towards hardest-in-batch.

    ``margin`` (not in the paper; 0 = its formula) adds m to each positive distance inside the
    softmax, S_ii = exp(scale * (2 - D_ii - m)), as additive-margin softmax losses do: the loss stays
    high until every negative is at least m farther than the positive, where the plain softmax is
    satisfied by any gap (HardNet's triplet keeps a margin of 1 for the same reason).
    """
    _check_pairs(anchor, positive)
    d = pairwise_l2(anchor, positive)
    if margin:
        d = d + margin * torch.eye(len(anchor), dtype=d.dtype, device=d.device)
    logits = scale * (2.0 - d)
    target = torch.arange(len(anchor), device=anchor.device)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.t(), target))


def descriptor_correlation_penalty(anchor: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """L2-Net's compactness term (Tian, Fan, Wu 2017, E2), averaged instead of summed.

    For each view (the B anchors, the B positives) separately: r_ij = the correlation across the batch
    of descriptor dimensions i and j (centred columns, divided by their norms); the term is the mean of
    r_ij^2 over i != j, averaged over the two views. It pushes the D dimensions to carry different
    information. The paper sums, E2 = 1/2 sum_views sum_(i != j) r_ij^2, against E1 summed over the B
    pairs: its weight relative to ``l2net_relative_loss`` (a mean) is D (D - 1) / B in these units.
    Shape: (B, D), (B, D) -> scalar.
    """
    _check_pairs(anchor, positive)
    d = anchor.shape[1]
    if d < 2:
        raise ValueError(f"the correlation penalty needs descriptors of at least 2 dimensions, got {d}")
    off = ~torch.eye(d, dtype=torch.bool, device=anchor.device)
    terms = []
    for view in (anchor, positive):
        centred = view - view.mean(0, keepdim=True)
        unit = centred / (centred.norm(dim=0, keepdim=True) + 1e-8)
        terms.append(((unit.t() @ unit)[off] ** 2).mean())
    return 0.5 * (terms[0] + terms[1])


def second_order_similarity(anchor: torch.Tensor, positive: torch.Tensor, knn: int = 8) -> torch.Tensor:
    """SOSNet's second-order similarity regulariser R_SOS (Tian et al. 2019, eqs. 5-6).

    With d the Euclidean distance and c_i = KNN(anchor_i among the anchors) U KNN(positive_i among the
    positives) (``knn`` each, i itself excluded):
    R_SOS = 1/B sum_i sqrt(sum_{j in c_i} (d(a_i, a_j) - d(p_i, p_j))^2).
    Matching pairs should keep the same distances to their neighbours in both views. The neighbour
    sets are chosen without gradient, as a selection.
    """
    _check_pairs(anchor, positive)
    if len(anchor) <= knn:
        raise ValueError(f"second-order similarity with knn={knn} needs a batch of more than {knn} pairs, got {len(anchor)}")
    da, dp = pairwise_l2(anchor, anchor), pairwise_l2(positive, positive)
    with torch.no_grad():
        eye = torch.eye(len(anchor), dtype=torch.bool, device=anchor.device)
        near = torch.zeros_like(eye)
        for d in (da, dp):
            near.scatter_(1, d.masked_fill(eye, float("inf")).topk(knn, dim=1, largest=False).indices, True)
    return torch.sqrt(((da - dp) ** 2 * near).sum(1) + 1e-12).mean()


def softmax_pair_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MatchNet's loss: cross-entropy of (B, 2) match logits (column 1 = match) against 0/1 labels."""
    if logits.ndim != 2 or logits.shape[1] != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (B, 2) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return torch.nn.functional.cross_entropy(logits, labels.long())


LossName = Literal["hardest_triplet", "triplet_random", "l2net_relative", "contrastive", "softmax_ce"]

# Raw losses by name (the keys are ``LossName``'s values, which configs and model metadata use).
# Inputs differ by family: the triplet losses and L2-Net's take (anchor, positive) descriptors of matching pairs,
# ``contrastive`` takes labelled descriptor pairs, ``softmax_ce`` labelled logits.
# ``batch_loss`` below turns a batch of matching pairs into any of them.
LOSSES: dict[LossName, Callable[..., torch.Tensor]] = {
    "hardest_triplet": hardest_in_batch_triplet_loss,
    "triplet_random": triplet_random_negative_loss,
    "l2net_relative": l2net_relative_loss,
    "contrastive": contrastive_loss,
    "softmax_ce": softmax_pair_loss,
}


def batch_loss(
    name: LossName,
    anchor: torch.Tensor,
    positive: torch.Tensor,
    *,
    margin: float = DEFAULT_MARGIN,
    anchor_swap: bool = True,
    scale: float = 1.0,
    relative_margin: float = 0.0,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    negatives: Negatives = "random",
    hard_candidates: HardCandidates = "random",
) -> torch.Tensor:
    """Loss ``name`` of a batch of B matching pairs, given their descriptors ``anchor``/``positive`` (B, D)
    (for a pair classifier: its per-patch features, and ``score`` = the model's ``score``).

    - ``hardest_triplet``: HardNet's loss (``anchor_swap`` applies).
    - ``triplet_random``: one in-batch negative per pair, random or (``negatives="hardest"``) the
      closest; ``anchor_swap`` is TFeat's swap (the negative distance is the smaller of
      anchor-negative and positive-negative).
    - ``l2net_relative``: L2-Net's relative-distance softmax over the whole batch, exponent times
      ``scale``, ``relative_margin`` added to the positive distances (``margin`` unused).
    - ``contrastive`` / ``softmax_ce``: the B matching pairs plus B non-matching pairs
      ``(a_i, p_pi(i))`` with pi = ``in_batch_negatives`` (balanced, as MatchNet's sampler), or with
      ``negatives="hardest"`` pi(i) = ``hardest_negative_index`` (closest in descriptor space), for the
      pair classifier ``highest_scoring_negative_index`` (most match-like by its own score); or with
      ``negatives="mixed"`` both: every matching pair twice and, for each, one random and one hard
      non-matching pair (4B pairs, still balanced), so that mining does not starve a classifier of the
      easy negatives it learns from first. ``hard_candidates``: which 16 in-batch non-matches the pair
      classifier scores for its hard one (``highest_scoring_negative_index``'s ``pool``).
    """
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    _check_pairs(anchor, positive)
    if name == "hardest_triplet":
        return hardest_in_batch_triplet_loss(anchor, positive, margin=margin, anchor_swap=anchor_swap)
    if name == "triplet_random":
        return triplet_random_negative_loss(anchor, positive, margin=margin, generator=generator, anchor_swap=anchor_swap,
                                            negatives=negatives)
    if name == "l2net_relative":
        return l2net_relative_loss(anchor, positive, scale=scale, margin=relative_margin)
    b = len(anchor)
    _check_negatives(negatives, name)
    chosen = []  # each positive's non-matching partners
    if negatives in ("random", "mixed"):
        chosen.append(in_batch_negatives(b, generator).to(anchor.device))
    if negatives in ("hardest", "mixed"):
        chosen.append(highest_scoring_negative_index(anchor, positive, score, generator=generator,
                                                     pool=hard_candidates)
                      if name == "softmax_ce" and score is not None else hardest_negative_index(anchor, positive))
    k = len(chosen)
    left = torch.cat([anchor] * 2 * k)
    right = torch.cat([positive] * k + [positive[perm] for perm in chosen])
    labels = torch.cat([torch.ones(k * b, device=anchor.device), torch.zeros(k * b, device=anchor.device)])
    if name == "contrastive":
        return contrastive_loss(left, right, labels, margin=margin)
    if score is None:
        raise ValueError("softmax_ce needs the pair classifier's score(f1, f2)")
    return softmax_pair_loss(score(left, right), labels)
