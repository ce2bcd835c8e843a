"""MatchNet (Han, Leung, Jia, Sukthankar, Berg 2015): a conv feature tower shared by both patches and a
fully connected metric network that classifies the pair as match / non-match.

Deployed as in the paper: ``forward`` computes each patch's tower features once; ``score`` runs the
metric network on two feature batches. Pooling uses ``ceil_mode=True`` as the original Caffe model
does, so a 64x64 patch gives 64 x 8 x 8 = 4096 features (the paper's F = 4096 without bottleneck);
the optional bottleneck layer is not implemented. ``input_size=32`` runs the same layers on 32x32
patches (64 x 4 x 4 = 1024 features) instead of upsampling them to 64x64.

Initialisation: the specified orthogonal init with gain 0.6 and bias 0.01 (``init="paper"``) shrinks the
signal ~2x per layer (rows of norm 0.6, then ReLU halves the power) and the 0.01 biases swamp it: on
real patches the logit gap varies by ~1e-3 across pairs at init (logits nearly input-independent) and
SGD hardly moves. The default (``init="he"``) keeps the orthogonal matrices with ReLU's gain sqrt(2)
(He et al. 2015: the power is kept through each conv/FC + ReLU), gain 1 on the last layer and zero
biases, so the logits start as a function of the patches.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from pipeline.models.registry import ModelInfo, check_patches, register_model


@register_model("matchnet", ModelInfo(input_size=64, descriptor_dim=64 * 8 * 8, default_loss="softmax_ce", pca="none",
                                      unit_norm=False, kind="pair_classifier"))
class MatchNet(nn.Module):
    """MatchNet tower + metric network.

    Inputs are [0, 1] grayscale patches; they are mapped to the paper's ``(pixel - 128) / 160`` on the
    0..255 scale.

    Shape: ``forward``: ``(B, 1, S, S) -> (B, F)`` tower features (not normalised), S = ``input_size``
    (64 or 32), F = 64 * (S / 8)^2 (4096 or 1024); ``score``: ``(B, F), (B, F) -> (B, 2)`` logits,
    index 1 = match.
    """

    def __init__(self, input_size: int = 64, init: Literal["he", "paper"] = "he") -> None:
        super().__init__()
        if input_size not in (32, 64):
            raise ValueError(f"MatchNet input_size must be 32 or 64, got {input_size}")
        if init not in ("he", "paper"):
            raise ValueError(f"MatchNet init must be 'he' or 'paper', got {init!r}")
        self.input_size: int = input_size
        self.descriptor_dim: int = 64 * (input_size // 8) ** 2  # three ceil-mode stride-2 pools

        def pool() -> nn.Module:
            return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)

        self.features = nn.Sequential(
            nn.Conv2d(1, 24, kernel_size=7, padding=3), nn.ReLU(), pool(),
            nn.Conv2d(24, 64, kernel_size=5, padding=2), nn.ReLU(), pool(),
            nn.Conv2d(64, 96, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(96, 96, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(96, 64, kernel_size=3, padding=1), nn.ReLU(), pool(),
        )  # fmt: skip
        self.metric = nn.Sequential(
            nn.Linear(2 * self.descriptor_dim, 1024), nn.ReLU(),
            nn.Linear(1024, 1024), nn.ReLU(),
            nn.Linear(1024, 2),
        )  # fmt: skip
        layers = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for m in layers:
            if init == "paper":
                nn.init.orthogonal_(m.weight, gain=0.6)
                nn.init.constant_(m.bias, 0.01)
            else:  # every layer but the last feeds a ReLU
                nn.init.orthogonal_(m.weight, gain=1.0 if m is layers[-1] else math.sqrt(2.0))
                nn.init.zeros_(m.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        check_patches(patches, self.input_size, "MatchNet")
        return self.features((patches * 255.0 - 128.0) / 160.0).flatten(1)

    def score(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """Match logits of feature pairs ``(f1[i], f2[i])``; column 1 is "match"."""
        if f1.shape != f2.shape or f1.ndim != 2 or f1.shape[1] != self.descriptor_dim:
            raise ValueError(f"MatchNet.score expects two (B, {self.descriptor_dim}) feature batches, got {tuple(f1.shape)} and {tuple(f2.shape)}")
        return self.metric(torch.cat([f1, f2], dim=1))

    def match_probability(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        return self.score(f1, f2).softmax(dim=1)[:, 1]

    def distance(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """A dissimilarity for ranking pairs (FPR95, mAP): ``logit_nonmatch - logit_match``, monotone in
        ``1 - match_probability`` but without the softmax's saturation (ties at p = 1 in float32)."""
        logits = self.score(f1, f2)
        return logits[:, 0] - logits[:, 1]
