"""SIFT (RootSIFT) through kornia's differentiable ``SIFTDescriptor``: the untrained baseline of every
table. State-dict keys are kornia's under the ``sift.`` prefix (``sift.pk.weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.registry import ModelInfo, check_patches, register_model


@register_model("sift", ModelInfo(input_size=32, descriptor_dim=128, default_loss=None, pca="none", unit_norm=True,
                                  trainable=False))
class SIFT(nn.Module):
    """RootSIFT descriptor of grayscale patches; no trainable parameters (the pooling kernel is frozen).

    Shape: ``(B, 1, S, S) -> (B, 128)`` with S = ``patch_size`` (32 by default), rows of unit L2 norm
    (a flat patch gives ``1e-5`` in every entry, kornia's RootSIFT epsilon).
    """

    def __init__(self, patch_size: int = 32) -> None:
        super().__init__()
        import kornia.feature  # imported on first use: registering the zoo stays light

        self.sift = kornia.feature.SIFTDescriptor(patch_size=patch_size, rootsift=True)
        self.input_size: int = patch_size
        # kornia stores the spatial pooling kernel as a Conv2d weight: freeze it, SIFT is not learned.
        self.requires_grad_(False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        check_patches(patches, self.input_size, "SIFT")
        return self.sift(patches)
