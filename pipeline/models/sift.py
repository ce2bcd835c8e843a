"""SIFT (RootSIFT) through kornia's differentiable ``SIFTDescriptor``: the untrained baseline.

Reuses ``pipeline.evaluate.SiftBaseline`` (so the state-dict keys are ``sift.pk.weight``: kornia's keys
under the ``sift.`` prefix); this adds the registry's conventions and the input check.
"""

from __future__ import annotations

import torch

from pipeline.evaluate import SiftBaseline
from pipeline.models import check_patches, register_model


class SIFT(SiftBaseline):
    """RootSIFT descriptor of grayscale patches; no trainable parameters (the pooling kernel is frozen).

    Shape: ``(B, 1, S, S) -> (B, 128)`` with S = ``patch_size`` (32 by default), rows of unit L2 norm
    (a flat patch gives ``1e-5`` in every entry, kornia's RootSIFT epsilon).
    """

    descriptor_dim = 128
    kind = "embedding"
    trainable = False
    unit_norm = True

    def __init__(self, patch_size: int = 32) -> None:
        super().__init__(patch_size=patch_size)
        self.input_size: int = patch_size
        # kornia stores the spatial pooling kernel as a Conv2d weight: freeze it, SIFT is not learned.
        self.requires_grad_(False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        check_patches(patches, self.input_size, "SIFT")
        return super().forward(patches)


@register_model("sift")
def sift(patch_size: int = 32) -> SIFT:
    return SIFT(patch_size=patch_size)
