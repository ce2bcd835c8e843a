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
