"""What one training step optimises, for every architecture, as one ``nn.Module`` so that DDP
wraps a single forward (a pair classifier's metric network and the MC-Loss feature maps are
used inside that forward, where DDP expects every parameter to be used)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LossConfig
from pipeline.losses import batch_loss
from pipeline.mcloss import diversity_term
from pipeline.models import DEFAULT_LOSS


def fit_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float patches to a model's input size (e.g. 32 px shards into MatchNet's 64 px)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


def loss_name(arch: str, loss: LossConfig) -> str:
    name = loss.name or DEFAULT_LOSS.get(arch)
    if name is None:
        raise ValueError(f"{arch!r} has no training loss")
    return name


class PairObjective(nn.Module):
    """``forward(x)`` with x = (2B, 1, P, P) interleaved pairs (a0, p0, a1, p1, ...) -> scalar loss."""

    def __init__(self, model: nn.Module, arch: str, loss: LossConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.model, self.loss, self.generator = model, loss, generator
        self.name = loss_name(arch, loss)
        # Models with a PCA head (HardNet8) are trained on the descriptor before PCA.
        self._describe = getattr(model, "embed", model.forward)
        self._last_maps: torch.Tensor | None = None
        if loss.mc_mu > 0:
            convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
            # the last conv maps that still have spatial extent: the input of a final 8x8 conv
            for conv in convs:
                conv.register_forward_hook(self._keep_maps)

    def _keep_maps(self, _module, _inputs, output: torch.Tensor) -> None:
        if output.shape[-1] > 1:
            self._last_maps = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0] // 2
        desc = self._describe(fit_input(x, self.model.input_size)).float().view(b, 2, -1)
        score = self.model.score if getattr(self.model, "kind", "embedding") == "pair_classifier" else None
        loss = batch_loss(self.name, desc[:, 0], desc[:, 1], margin=self.loss.margin,
                          anchor_swap=self.loss.anchor_swap, score=score, generator=self.generator)
        if self.loss.mc_mu > 0:
            maps = self._last_maps.float()
            groups = maps.shape[1] // self.loss.mc_xi * self.loss.mc_xi
            # label-free MC-Loss term: reward channels of a group attending to different places
            loss = loss - self.loss.mc_mu * self.loss.mc_lambda * diversity_term(maps[:, :groups], self.loss.mc_xi)
        return loss
