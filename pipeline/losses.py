"""Losses for descriptor learning."""

from __future__ import annotations

import torch


def pairwise_l2(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) Euclidean distances; ``eps`` keeps the sqrt differentiable at 0."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * a @ b.t()
    return torch.sqrt(sq.clamp_min(0.0) + eps)


def hardest_in_batch_triplet_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    margin: float = 1.0,
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
