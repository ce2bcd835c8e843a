"""L2-Net (Tian, Fan, Wu 2017): the body HardNet builds on, without HardNet's dropout.

Layout: 3x3 convs 32, 32, 64/2, 64, 128/2, 128, each BatchNorm(affine=False) + ReLU, then an 8x8
conv to 128 + BatchNorm(affine=False), L2 normalised; patches are standardised per patch first. The
state-dict keys are HardNet's except that the final conv is ``features.18`` (HardNet's dropout sits
at index 18).

L2-Net's own loss (relative-distance softmax + compactness + intermediate-map terms) is not
reproduced: it trains with the plain triplet margin loss on random in-batch negatives, which also
makes it HardNet's ablation (same body, no hard mining).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.hardnet import FullWindowConv, HardNet, _conv_bn_relu
from pipeline.models.registry import ModelInfo, check_patches, register_model


@register_model("l2net", ModelInfo(input_size=32, descriptor_dim=128, default_loss="l2net_relative", pca="attach",
                                   unit_norm=True))
class L2Net(nn.Module):
    """L2-Net descriptor of grayscale patches.

    Shape: ``(B, 1, 32, 32) -> (B, 128)``, rows of unit L2 norm.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, 32),
            *_conv_bn_relu(32, 32),
            *_conv_bn_relu(32, 64, stride=2),
            *_conv_bn_relu(64, 64),
            *_conv_bn_relu(64, 128, stride=2),
            *_conv_bn_relu(128, 128),
            FullWindowConv(128, 128, kernel_size=8, bias=False),
            nn.BatchNorm2d(128, affine=False),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # as HardNet: orthogonal, gain 0.6
                nn.init.orthogonal_(m.weight, gain=0.6)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        check_patches(patches, self.input_size, "L2Net")
        x = self.features(HardNet._normalize_input(patches))
        return F.normalize(x.flatten(1), dim=1)
