"""Fitting a PCA of descriptors. The head that applies it inside a model (buffers, so that a logged
model carries its projection) is ``pipeline.models.pca_head``, re-exported here.

Convention (scikit-learn's): ``components`` is ``(dim, D)``, one principal axis per row, ``mean`` is
``(D,)``.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.pca_head import PCAAttached, PCAProjection, attach_pca, pca_head_dim, project

__all__ = ["PCAAttached", "PCAProjection", "attach_pca", "fit_pca", "pca_head_dim", "project"]


def fit_pca(descriptors: torch.Tensor | np.ndarray, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) descriptors -> ``(components (dim, D), mean (D,))``, float32 tensors: scikit-learn's
    ``PCA(dim)`` fitted in float64 (``components_``, ``mean_``; the sign of each component fixed as
    scikit-learn >= 1.5 fixes it: its entry of largest magnitude is positive).

    With many more descriptors than dimensions (the usual case: 1e5 x 512) the D x D covariance's
    eigendecomposition (``covariance_eigh``) costs one (N, D) matmul instead of an (N, D) SVD.
    """
    x = descriptors.detach().cpu().double().numpy() if isinstance(descriptors, torch.Tensor) else np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"fit_pca expects (N, D) descriptors, got shape {x.shape}")
    n, d = x.shape
    if not 1 <= dim <= min(n, d):
        raise ValueError(f"PCA dim must be in [1, min(N, D)] = [1, {min(n, d)}], got {dim}")
    from sklearn.decomposition import PCA  # imported here: sklearn adds ~1.3 s to every Train worker's start

    pca = PCA(n_components=dim, svd_solver="covariance_eigh" if n > d else "full").fit(x)
    # contiguous: scikit-learn may hand back a transposed view, and a strided buffer would make the same
    # projection differ in the last bits from one loaded into a contiguous buffer
    return torch.from_numpy(np.ascontiguousarray(pca.components_)).float(), torch.from_numpy(pca.mean_).float()
