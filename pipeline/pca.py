"""PCA of descriptors, kept inside the model as buffers so that a logged model carries its projection.

Convention (scikit-learn's): ``components`` is ``(dim, D)``, one principal axis per row, ``mean`` is
``(D,)``; a descriptor ``x`` projects to ``normalize((x - mean) @ components.T)``. The output is
re-normalised because the distances downstream (FPR95, HPatches mAP, the triplet margins) assume unit
descriptors, as HardNet8's own PCA head does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def fit_pca(descriptors: torch.Tensor | np.ndarray, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) descriptors -> ``(components (dim, D), mean (D,))``, float32 tensors.

    Agrees with ``sklearn.decomposition.PCA(dim).fit(x)`` (``components_``, ``mean_``) up to the sign
    of each component; the sign is fixed as scikit-learn >= 1.5 fixes it (the entry of largest
    magnitude of each component is positive), so in practice the two agree exactly.
    """
    x = descriptors.detach().cpu().double().numpy() if isinstance(descriptors, torch.Tensor) else np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"fit_pca expects (N, D) descriptors, got shape {x.shape}")
    n, d = x.shape
    if not 1 <= dim <= min(n, d):
        raise ValueError(f"PCA dim must be in [1, min(N, D)] = [1, {min(n, d)}], got {dim}")
    mean = x.mean(axis=0)
    xc = x - mean
    if n > d:
        # Many more descriptors than dimensions (the usual case: 1e5 x 512): the D x D covariance's
        # eigendecomposition costs one (N, D) matmul instead of an (N, D) SVD.
        evals, evecs = np.linalg.eigh(xc.T @ xc)
        components = evecs[:, np.argsort(evals)[::-1][:dim]].T
    else:
        components = np.linalg.svd(xc, full_matrices=False)[2][:dim]
    rows = np.arange(dim)
    components = components * np.sign(components[rows, np.abs(components).argmax(axis=1)])[:, None]
    return torch.from_numpy(components).float(), torch.from_numpy(mean).float()


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
    """An embedding model followed by a PCA projection; carries the model conventions of
    ``pipeline.models`` (``input_size``, ``descriptor_dim`` = PCA dim, ``kind``, ``trainable``,
    ``unit_norm``). State-dict keys: ``backbone.*``, ``pca.components``, ``pca.mean``.

    Shape: ``(B, 1, S, S) -> (B, dim)``, rows of unit L2 norm.
    """

    kind = "embedding"
    unit_norm = True

    def __init__(self, backbone: nn.Module, pca: PCAProjection) -> None:
        super().__init__()
        self.backbone = backbone
        self.pca = pca
        self.input_size: int = backbone.input_size
        self.descriptor_dim: int = pca.dim
        self.trainable: bool = getattr(backbone, "trainable", True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.pca(self.backbone(patches))


def attach_pca(model: nn.Module, components: torch.Tensor, mean: torch.Tensor) -> PCAAttached:
    """Wrap an embedding model so that it outputs PCA-projected, re-normalised descriptors."""
    if getattr(model, "kind", "embedding") != "embedding":
        raise ValueError(f"PCA applies to embedding models, not to a {model.kind!r} model")
    if components.shape[-1] != model.descriptor_dim:
        raise ValueError(f"components are for {components.shape[-1]}-d descriptors, the model outputs {model.descriptor_dim}-d")
    return PCAAttached(model, PCAProjection(components, mean))
