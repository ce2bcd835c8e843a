"""A Siamese CNN in the style of the classic PyTorch contrastive-loss example: three blocks of
ReflectionPad + 3x3 conv + ReLU + BatchNorm + Dropout2d (channels 1 -> 4 -> 8 -> 8) and a fully
connected head 500 -> 500 -> D, trained with the contrastive loss (Hadsell, Chopra, LeCun 2006).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.registry import ModelInfo, check_patches, register_model


def _block(cin: int, cout: int, dropout: float) -> list[nn.Module]:
    return [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, kernel_size=3), nn.ReLU(), nn.BatchNorm2d(cout), nn.Dropout2d(dropout)]


@register_model("siamese", ModelInfo(input_size=32, descriptor_dim=128, default_loss="contrastive", pca="attach",
                                     unit_norm=False))
class Siamese(nn.Module):
    """Siamese-CNN embedding of [0, 1] grayscale patches.

    The output is deliberately NOT normalised: the contrastive loss acts on raw Euclidean distances
    and its margin sets their scale (normalising would cap every distance at 2).

    Shape: ``(B, 1, S, S) -> (B, D)``, S = ``input_size`` (32 or 64), D = ``descriptor_dim``.
    """

    def __init__(self, input_size: int = 32, descriptor_dim: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        if input_size not in (32, 64):
            raise ValueError(f"Siamese input_size must be 32 or 64, got {input_size}")
        self.input_size: int = input_size
        self.descriptor_dim: int = descriptor_dim
        self.cnn = nn.Sequential(*_block(1, 4, dropout), *_block(4, 8, dropout), *_block(8, 8, dropout))
        self.fc = nn.Sequential(
            nn.Linear(8 * input_size * input_size, 500), nn.ReLU(),
            nn.Linear(500, 500), nn.ReLU(),
            nn.Linear(500, descriptor_dim),
        )  # fmt: skip

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        check_patches(patches, self.input_size, "Siamese")
        return self.fc(self.cnn(patches).flatten(1))
