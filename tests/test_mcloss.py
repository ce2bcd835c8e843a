"""MC-Loss against a loop-by-loop re-implementation of the reference code's ``supervisor`` (PRIS-CV/
Mutual-Channel-Loss, CUB-200-2011.py) on fixed masks, and the diversity term's bounds."""

import math

import pytest
import torch

from pipeline.mcloss import diversity_term, mc_loss, random_channel_mask


def reference_terms(x, labels, num_classes, xi, mask):
    """The reference's two terms, one sample / class / position at a time (plain Python floats).
    The reference returns ``1 - L_div / xi`` as its second term; this returns L_div itself."""
    b, _, h, w = x.shape
    ce, div = 0.0, 0.0
    for n in range(b):
        logits = []
        for c in range(num_classes):
            chans = range(c * xi, (c + 1) * xi)
            # discriminality: mask, max over the class's channels at each position, average over positions
            logits.append(sum(max(float(x[n, k, i, j]) * float(mask[k]) for k in chans) for i in range(h) for j in range(w)) / (h * w))
            # diversity: spatial softmax per channel, max over the class's channels, sum over positions
            soft = {}
            for k in chans:
                z = sum(math.exp(float(x[n, k, i, j])) for i in range(h) for j in range(w))
                soft[k] = [[math.exp(float(x[n, k, i, j])) / z for j in range(w)] for i in range(h)]
            div += sum(max(soft[k][i][j] for k in chans) for i in range(h) for j in range(w))
        lse = math.log(sum(math.exp(v) for v in logits))
        ce += lse - logits[int(labels[n])]
    return ce / b, div / (b * num_classes)


@pytest.mark.parametrize("num_classes,xi", [(4, 3), (3, 2), (2, 5)])
def test_matches_reference_on_fixed_mask(num_classes, xi):
    g = torch.Generator().manual_seed(num_classes * 10 + xi)
    x = torch.randn(3, num_classes * xi, 4, 5, generator=g)
    labels = torch.randint(0, num_classes, (3,), generator=g)
    mask = random_channel_mask(num_classes, xi, g)
    total, l_dis, l_div = mc_loss(x, labels, num_classes, xi, mu=1.5, lam=0.3, mask=mask)
    ref_dis, ref_div = reference_terms(x, labels, num_classes, xi, mask)
    assert math.isclose(l_dis.item(), ref_dis, rel_tol=1e-5)
    assert math.isclose(l_div.item(), ref_div, rel_tol=1e-5)
    assert math.isclose(total.item(), 1.5 * (ref_dis - 0.3 * ref_div), rel_tol=1e-5)


def test_reference_mask_keeps_two_of_three_per_class():
    g = torch.Generator().manual_seed(0)
    for xi in (1, 2, 3, 4, 5):
        masks = torch.stack([random_channel_mask(50, xi, g) for _ in range(4)])
        per_class = masks.view(4, 50, xi).sum(2)
        assert (per_class == math.ceil(xi / 2)).all()
    m3 = torch.stack([random_channel_mask(1, 3, g) for _ in range(300)])
    assert (m3.mean(0) - 2 / 3).abs().max() < 0.1  # the dropped channel is uniform over the 3


def test_default_mask_is_random_and_seedable():
    x = torch.randn(4, 6, 3, 3)
    labels = torch.tensor([0, 1, 0, 1])
    a = mc_loss(x, labels, 2, 3, 1.0, 1.0, generator=torch.Generator().manual_seed(1))[1]
    b = mc_loss(x, labels, 2, 3, 1.0, 1.0, generator=torch.Generator().manual_seed(1))[1]
    assert a == b


def test_diversity_bounds():
    xi, h, w = 4, 5, 5
    same = torch.full((2, 2 * xi, h, w), -30.0)
    same[:, :, 2, 3] = 30.0  # every channel peaks at the same place
    assert math.isclose(diversity_term(same, xi).item(), 1.0, rel_tol=1e-4)
    distinct = torch.full((2, 2 * xi, h, w), -30.0)
    for k in range(2 * xi):
        distinct[:, k, k % xi, (k % xi) + 1] = 30.0  # each channel of a group at its own place
    assert math.isclose(diversity_term(distinct, xi).item(), float(xi), rel_tol=1e-4)
    rand = diversity_term(torch.randn(3, 2 * xi, h, w), xi).item()
    assert 1.0 <= rand <= xi


def test_diversity_is_label_free_and_differentiable():
    x = torch.randn(2, 128, 8, 8, requires_grad=True)  # e.g. a descriptor tower's last conv maps
    diversity_term(x, 4).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="groups of xi"):
        diversity_term(torch.randn(1, 7, 3, 3), 3)
    with pytest.raises(ValueError, match="channels"):
        mc_loss(torch.randn(1, 9, 3, 3), torch.tensor([0]), 2, 3, 1.0, 1.0)
