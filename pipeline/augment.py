"""Batch augmentation for patch pairs. Runs on whole batches, after the uint8 -> float
conversion, on the training device."""

from __future__ import annotations

import torch
from torch import nn


def fliprot(pairs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """HardNet's augmentation: one random transpose + flip per pair, applied to both patches
    (the pair must stay a pair). ``pairs``: (B, 2, P, P)."""
    transpose = torch.rand(len(pairs), generator=generator) < 0.5
    flip = torch.rand(len(pairs), generator=generator) < 0.5
    out = pairs.clone()
    out[transpose] = out[transpose].transpose(-1, -2)
    out[flip] = out[flip].flip(-1)
    return out


def make_jitter(max_rotation_deg: float, max_scale: float) -> nn.Module | None:
    """Independent small rotation / zoom of every patch (kornia's RandomAffine), mimicking a
    detector's orientation and scale noise between the two views; None when both are 0."""
    if max_rotation_deg == 0 and max_scale == 0:
        return None
    import kornia.augmentation as K

    return K.RandomAffine(
        degrees=max_rotation_deg, scale=(1 - max_scale, 1 + max_scale), p=1.0, padding_mode="reflection"
    )
