"""HardNet8 (Pultar 2020, "Improving the HardNet Descriptor"): a wider L2-Net body with a 512-d output,
projected by PCA to a smaller dimension kept in the model as buffers.

Layer layout and state-dict keys are those of ``kornia.feature.HardNet8`` (tests/test_models.py checks
both directions of loading and equal outputs). kornia stores its PCA as ``components`` of shape
``(512, dim)`` (its forward computes ``(x - mean) @ components``); this module keeps that layout so a
kornia checkpoint (e.g. ``hardnet8v2.pt``) loads unchanged. That is the transpose of
``pipeline.models.pca_head``'s scikit-learn layout ``(dim, 512)``: ``set_pca`` takes the latter and transposes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.hardnet import FullWindowConv, _conv_bn_relu
from pipeline.models.pca_head import project
from pipeline.models.registry import ModelInfo, check_patches, register_model

FEATURE_DIM = 512


@register_model("hardnet8", ModelInfo(input_size=32, descriptor_dim=128, default_loss="hardest_triplet", pca="own",
                                      unit_norm=True))
class HardNet8(nn.Module):
    """HardNet8 descriptor of grayscale patches (standardised per patch, like HardNet).

    Shape: ``(B, 1, 32, 32) -> (B, pca_dim)`` (``(B, 512)`` with ``pca_dim=None``), rows of unit L2 norm.

    With ``pca_dim`` set, the PCA buffers start as kornia's placeholder (keep the first ``pca_dim``
    of the 512 features) until ``set_pca`` installs a fitted projection.
    """

    def __init__(self, pca_dim: int | None = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, 32),
            *_conv_bn_relu(32, 32),
            *_conv_bn_relu(32, 64, stride=2),
            *_conv_bn_relu(64, 64),
            *_conv_bn_relu(64, 128, stride=2),
            *_conv_bn_relu(128, 128),
            *_conv_bn_relu(128, 256),
            nn.Dropout(dropout),
            FullWindowConv(256, FEATURE_DIM, kernel_size=8, bias=False),
            nn.BatchNorm2d(FEATURE_DIM, affine=False),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # kornia's / the paper's init: orthogonal, gain 0.6
                nn.init.orthogonal_(m.weight, gain=0.6)
        self.pca_dim = pca_dim
        if pca_dim is not None:
            if not 1 <= pca_dim <= FEATURE_DIM:
                raise ValueError(f"pca_dim must be in [1, {FEATURE_DIM}] or None, got {pca_dim}")
            self.register_buffer("components", torch.eye(FEATURE_DIM, pca_dim))
            self.register_buffer("mean", torch.zeros(FEATURE_DIM))
        self.descriptor_dim: int = FEATURE_DIM if pca_dim is None else pca_dim

    @staticmethod
    def _normalize_input(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
        std, mean = torch.std_mean(x, dim=(-3, -2, -1), keepdim=True)
        return (x - mean.detach()) / (std.detach() + eps)

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """The unit 512-d descriptor before PCA: what ``pipeline.pca.fit_pca`` is fitted on."""
        check_patches(patches, self.input_size, "HardNet8")
        return F.normalize(self.features(self._normalize_input(patches)).flatten(1), dim=1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.embed(patches)
        if self.pca_dim is None:
            return x
        return project(x, self.components.t(), self.mean)

    @torch.no_grad()
    def set_pca(self, components: torch.Tensor, mean: torch.Tensor) -> None:
        """Install a fitted PCA, ``components`` in ``pipeline.pca.fit_pca``'s ``(dim, 512)`` layout; ``dim`` may
        differ from the current ``pca_dim`` (the buffers are replaced and ``descriptor_dim`` follows)."""
        if components.ndim != 2 or components.shape[1] != FEATURE_DIM or mean.shape != (FEATURE_DIM,):
            raise ValueError(f"expected components (dim, {FEATURE_DIM}) and mean ({FEATURE_DIM},), got {tuple(components.shape)}, {tuple(mean.shape)}")
        device = self.features[0].weight.device
        self.register_buffer("components", components.t().contiguous().float().to(device))
        self.register_buffer("mean", mean.float().to(device))
        self.pca_dim = self.descriptor_dim = components.shape[0]
