"""TFeat (Balntas et al. 2016): a shallow tanh network trained with triplets.

Layer layout and state-dict keys are those of ``kornia.feature.TFeat``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.registry import ModelInfo, check_patches, register_model


@register_model("tfeat", ModelInfo(input_size=32, descriptor_dim=128, default_loss="triplet_random", pca="attach",
                                   unit_norm=False))
class TFeat(nn.Module):
    """TFeat descriptor of grayscale patches (InstanceNorm first, so the intensity range is free).

    Shape: ``(B, 1, 32, 32) -> (B, 128)``; entries in [-1, 1] (final tanh), rows NOT unit norm, as in
    the reference implementation: the triplet margin is on these raw distances.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.InstanceNorm2d(1, affine=False),
            nn.Conv2d(1, 32, kernel_size=7),
            nn.Tanh(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(32, 64, kernel_size=6),
            nn.Tanh(),
        )
        self.descr = nn.Sequential(nn.Linear(64 * 8 * 8, 128), nn.Tanh())

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        check_patches(patches, self.input_size, "TFeat")
        return self.descr(self.features(patches).flatten(1))
