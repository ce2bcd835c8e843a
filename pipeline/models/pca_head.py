"""PCA heads kept inside a model as buffers, so that a logged model carries its projection.
(Fitting a PCA is ``pipeline.pca``'s.)

Convention (scikit-learn's): ``components`` is ``(dim, D)``, one principal axis per row, ``mean`` is
``(D,)``; a descriptor ``x`` projects to ``normalize((x - mean) @ components.T)``. The output is
re-normalised because the distances downstream (FPR95, HPatches mAP, the triplet margins) assume unit
descriptors, as HardNet8's own PCA head does.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.registry import ModelInfo


def project(x: torch.Tensor, components: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``normalize((x - mean) @ components.T)``; an all-zero row stays zero."""
    return F.normalize((x - mean) @ components.t(), dim=1)


class PCAProjection(nn.Module):
    """Shape: ``(B, D) -> (B, dim)``, rows of unit L2 norm. ``components`` (dim, D), ``mean`` (D,) are buffers."""

    def __init__(self, components: torch.Tensor, mean: torch.Tensor) -> None:
        super().__init__()
        if components.ndim != 2 or mean.shape != (components.shape[1],):
            raise ValueError(f"components must be (dim, D) and mean (D,), got {tuple(components.shape)} and {tuple(mean.shape)}")
        self.register_buffer("components", components.detach().clone().float())
        self.register_buffer("mean", mean.detach().clone().float())

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.components, self.mean)


class PCAAttached(nn.Module):
    """An embedding model followed by a PCA projection. ``info`` is the backbone's, with the PCA's
    dimension and unit norm. State-dict keys: ``backbone.*``, ``pca.components``, ``pca.mean``.

    Shape: ``(B, 1, S, S) -> (B, dim)``, rows of unit L2 norm.
    """

    def __init__(self, backbone: nn.Module, pca: PCAProjection) -> None:
        super().__init__()
        self.backbone = backbone
        self.pca = pca
        self.input_size: int = backbone.input_size
        self.descriptor_dim: int = pca.dim

    @property
    def info(self) -> ModelInfo:
        # derived on access, so a pickled PCAAttached follows its backbone class's current metadata
        return replace(self.backbone.info, descriptor_dim=self.descriptor_dim, unit_norm=True, pca="none")

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.pca(self.backbone(patches))


def pca_head_dim(model: nn.Module) -> int | None:
    """The output dimension of the model's PCA head (an attached one, or its own: HardNet8's
    ``pca_dim``); None when it has none."""
    if isinstance(model, PCAAttached):
        return model.descriptor_dim
    if model.info.pca == "own":
        return model.pca_dim
    return None


def attach_pca(model: nn.Module, components: torch.Tensor, mean: torch.Tensor) -> PCAAttached:
    """Wrap an embedding model so that it outputs PCA-projected, re-normalised descriptors."""
    if model.info.kind != "embedding":
        raise ValueError(f"PCA applies to embedding models, not to a {model.info.kind!r} model")
    if components.shape[-1] != model.descriptor_dim:
        raise ValueError(f"components are for {components.shape[-1]}-d descriptors, the model outputs {model.descriptor_dim}-d")
    return PCAAttached(model, PCAProjection(components, mean))
