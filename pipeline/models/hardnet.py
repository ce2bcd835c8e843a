"""HardNet (Mishchuk et al. 2017): the L2-Net body with dropout, trained with hardest-in-batch
triplet margin loss (``pipeline.losses.hardest_in_batch_triplet_loss``).

Layer layout and state-dict keys are those of ``kornia.feature.HardNet``, so weights move between
the two unchanged (tests/test_models.py checks they give the same descriptors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.registry import ModelInfo, check_patches, register_model


class FullWindowConv(nn.Conv2d):
    """The towers' last layer: a convolution whose kernel covers its whole input (8x8 over 8x8 maps),
    so one output per patch. An ``nn.Conv2d`` in parameters, state-dict keys and results, computed as
    the matrix product it is: oneDNN's convolution kernels handle this shape poorly on CPU, where
    HardNet8's 256 -> 512 layer took 1399 ms forward + backward at batch 256 against 155 ms as a GEMM
    (2 AVX2 threads, medians of 3 rounds; ``benchmarks/full_window_conv.py``, benchmarks/README).
    Any other input size goes to the convolution.

    Shape: ``(B, C_in, k, k) -> (B, C_out, 1, 1)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.bias is not None or self.groups != 1 or self.padding != (0, 0) or self.dilation != (1, 1)
                or tuple(x.shape[-2:]) != self.kernel_size):
            return super().forward(x)
        # (C_in, kh, kw) flattened in the same order on both sides (a channels_last input is copied);
        # flatten, not reshape(len(x), -1): a TorchScript trace would keep the example's batch size
        return F.linear(x.flatten(1), self.weight.flatten(1))[:, :, None, None]


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout, affine=False),
        nn.ReLU(),
    ]


@register_model("hardnet", ModelInfo(input_size=32, descriptor_dim=128, default_loss="hardest_triplet", pca="attach",
                                     unit_norm=True))
class HardNet(nn.Module):
    """HardNet descriptor of grayscale patches.

    Each patch is standardised to zero mean / unit std first, so the intensity range of the
    input does not matter ([0, 1] floats by convention).

    Shape: ``(B, 1, 32, 32) -> (B, 128)``, rows of unit L2 norm.
    """

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
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
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # HardNet's init: orthogonal, gain 0.6
                nn.init.orthogonal_(m.weight, gain=0.6)

    @staticmethod
    def _normalize_input(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        std, mean = torch.std_mean(x, dim=(-3, -2, -1), keepdim=True)
        return (x - mean.detach()) / (std.detach() + eps)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        check_patches(patches, self.input_size, "HardNet")
        x = self.features(self._normalize_input(patches))
        return F.normalize(x.flatten(1), dim=1)
