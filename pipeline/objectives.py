"""What one training step optimises, for every architecture, as one ``nn.Module`` so that DDP
wraps a single forward (a pair classifier's metric network and the MC-Loss feature maps are
used inside that forward, where DDP expects every parameter to be used)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import LossConfig
from pipeline.losses import LossName, batch_loss, descriptor_correlation_penalty, second_order_similarity
from pipeline.mcloss import diversity_term
from pipeline.models import fit_input, model_info


def loss_name(arch: str, loss: LossConfig) -> LossName:
    """The configured loss, else the architecture's registered default."""
    name = loss.name or model_info(arch).default_loss
    if name is None:
        raise ValueError(f"{arch!r} has no training loss")
    return name


class PairObjective(nn.Module):
    """``forward(x)`` with x = (2B, 1, P, P) interleaved pairs (a0, p0, a1, p1, ...) -> scalar loss."""

    def __init__(self, model: nn.Module, arch: str, loss: LossConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.model, self.loss, self.generator = model, loss, generator
        self.name = loss_name(arch, loss)
        info = model_info(arch)
        # Models with their own PCA head (HardNet8) are trained on the descriptor before PCA.
        self._describe = model.embed if info.pca == "own" else model.forward
        self._score = model.score if info.kind == "pair_classifier" else None
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
        loss = batch_loss(self.name, desc[:, 0], desc[:, 1], margin=self.loss.margin,
                          anchor_swap=self.loss.anchor_swap, scale=self.loss.scale, relative_margin=self.loss.relative_margin,
                          score=self._score, generator=self.generator, negatives=self.loss.negatives,
                          hard_candidates=self.loss.hard_candidates)
        if self.loss.sos_weight > 0:
            loss = loss + self.loss.sos_weight * second_order_similarity(desc[:, 0], desc[:, 1], self.loss.sos_knn)
        if self.loss.compactness_weight > 0:
            loss = loss + self.loss.compactness_weight * descriptor_correlation_penalty(desc[:, 0], desc[:, 1])
        if self.loss.mc_mu > 0:
            maps = self._last_maps.float()
            groups = maps.shape[1] // self.loss.mc_xi * self.loss.mc_xi
            # label-free MC-Loss term: reward channels of a group attending to different places
            loss = loss - self.loss.mc_mu * self.loss.mc_lambda * diversity_term(maps[:, :groups], self.loss.mc_xi)
        return loss
