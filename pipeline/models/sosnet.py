"""SOSNet (Tian et al. 2019): the L2-Net body behind an InstanceNorm, dropout 0.1, and a
LocalResponseNorm spanning all channels as the L2 normalisation.

Layer layout and state-dict keys are those of ``kornia.feature.SOSNet``. Trained here with HardNet's
hardest-in-batch loss; SOSNet's second-order similarity regulariser is not implemented.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.hardnet import FullWindowConv, _conv_bn_relu
from pipeline.models.registry import ModelInfo, check_patches, register_model


@register_model("sosnet", ModelInfo(input_size=32, descriptor_dim=128, default_loss="hardest_triplet", pca="attach",
                                    unit_norm=True))
class SOSNet(nn.Module):
    """SOSNet descriptor of grayscale patches.

    Shape: ``(B, 1, 32, 32) -> (B, 128)``, rows of unit L2 norm.
    """

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.InstanceNorm2d(1, affine=False),
            *_conv_bn_relu(1, 32),
            *_conv_bn_relu(32, 32),
            *_conv_bn_relu(32, 64, stride=2),
            *_conv_bn_relu(64, 64),
            *_conv_bn_relu(64, 128, stride=2),
            *_conv_bn_relu(128, 128),
            nn.Dropout(dropout),
            FullWindowConv(128, 128, kernel_size=8, bias=False),
            nn.BatchNorm2d(128, affine=False),
        )
        # LRN with a window (256) wider than the 128 channels, alpha = size, k = 0, beta = 1/2 divides
        # each entry by the L2 norm over all channels: an L2 normalisation.
        self.desc_norm = nn.Sequential(nn.LocalResponseNorm(256, alpha=256.0, beta=0.5, k=0.0))

    def forward(self, patches: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        check_patches(patches, self.input_size, "SOSNet")
        # kornia adds eps to every entry before the norm: it keeps an all-zero descriptor defined.
        return self.desc_norm(self.layers(patches) + eps).flatten(1)
