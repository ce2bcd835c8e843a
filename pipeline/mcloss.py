"""Mutual-Channel Loss (Chang et al., "The Devil is in the Channels: Mutual-Channel Loss for
Fine-Grained Image Classification", IEEE TIP 2020).

Feature maps ``(B, C * xi, H, W)``: C classes (or, label-free, C channel groups), ``xi`` consecutive
channels per class, as in the reference code (PRIS-CV/Mutual-Channel-Loss, ``supervisor``), whose
cross-channel max pooling (CCMP) pools channels ``[c * xi, (c + 1) * xi)`` into class c.

- Discriminality L_dis: channel-wise attention (a random 0/1 mask keeping ceil(xi / 2) of each class's
  xi channels; the reference keeps 2 of 3 and draws one mask per call, shared by the whole batch),
  CCMP -> (B, C, H, W), global average pooling -> (B, C) logits, cross-entropy with the labels.
- Diversity L_div: softmax over the H * W positions of every channel, CCMP, sum over positions, mean
  over classes and batch. It lies in [1, xi]: 1 when a class's channels all peak at the same place,
  xi when they attend to disjoint places.
- Total (the paper's eq.): mu * (L_dis - lam * L_div). The reference training script instead adds
  ``alpha * L_dis + beta * (1 - L_div / xi)`` to its own cross-entropy; that is the same objective up
  to a constant with mu = alpha and lam = beta / (alpha * xi).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ccmp(x: torch.Tensor, xi: int) -> torch.Tensor:
    """Cross-channel max pooling: (B, G * xi, ...) -> (B, G, ...), max over each group of xi channels."""
    b, k = x.shape[:2]
    return x.reshape(b, k // xi, xi, *x.shape[2:]).amax(dim=2)


def _check(features: torch.Tensor, xi: int) -> None:
    if features.ndim != 4:
        raise ValueError(f"MC-loss expects feature maps (B, C * xi, H, W), got {tuple(features.shape)}")
    if xi < 1 or features.shape[1] % xi:
        raise ValueError(f"{features.shape[1]} channels do not split into groups of xi = {xi}")


def random_channel_mask(num_classes: int, xi: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_classes * xi,) float 0/1 mask with exactly ceil(xi / 2) ones per class, at random places."""
    keep = math.ceil(xi / 2)
    ranks = torch.rand(num_classes, xi, generator=generator).argsort(dim=1).argsort(dim=1)
    return (ranks < keep).float().reshape(-1)


def diversity_term(features: torch.Tensor, xi: int) -> torch.Tensor:
    """L_div of (B, G * xi, H, W) feature maps; needs no labels (usable on any conv tower's last maps)."""
    _check(features, xi)
    attention = F.softmax(features.flatten(2), dim=2)  # (B, G * xi, H * W)
    return _ccmp(attention, xi).sum(dim=2).mean()


def discriminality_term(features: torch.Tensor, labels: torch.Tensor, xi: int, mask: torch.Tensor) -> torch.Tensor:
    """L_dis: cross-entropy of GAP(CCMP(features * mask)); ``mask`` (C * xi,) or (B, C * xi)."""
    _check(features, xi)
    logits = _ccmp(features * mask.to(features).reshape(-1, features.shape[1], 1, 1), xi).mean(dim=(2, 3))
    return F.cross_entropy(logits, labels)


def mc_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    xi: int,
    mu: float,
    lam: float,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mu * (L_dis - lam * L_div), L_dis, L_div)`` of (B, num_classes * xi, H, W) feature maps.

    ``mask`` defaults to a fresh ``random_channel_mask`` (drawn with ``generator``), shared by the batch.
    """
    _check(features, xi)
    if features.shape[1] != num_classes * xi:
        raise ValueError(f"expected {num_classes} * {xi} = {num_classes * xi} channels, got {features.shape[1]}")
    if mask is None:
        mask = random_channel_mask(num_classes, xi, generator)
    l_dis = discriminality_term(features, labels, xi, mask)
    l_div = diversity_term(features, xi)
    return mu * (l_dis - lam * l_div), l_dis, l_div
