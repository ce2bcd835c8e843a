"""Fitting the linear head of descriptors: a PCA, or learned whitening. The head that applies either
inside a model (buffers, so that a logged model carries its projection) is ``pipeline.models.pca_head``,
re-exported here.

Convention (scikit-learn's): ``components`` is ``(dim, D)``, one principal axis per row, ``mean`` is
``(D,)``.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.pca_head import PCAAttached, PCAProjection, attach_pca, pca_head_dim, project

__all__ = ["PCAAttached", "PCAProjection", "attach_pca", "fit_learned_whitening", "fit_pca", "pca_head_dim", "project"]

# Learned whitening's shrinkage: the eigenvalues of the matching-difference covariance get this times
# their mean added before inversion (0 = exact whitening, noisy from ~1000 positives in 128 dimensions;
# large = plain PCA). 0.5 was chosen on synthetic data (benchmarks/README.md, "Learned whitening for the
# demo's head").
LW_SHRINKAGE = 0.5


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


def _signed(rows: np.ndarray) -> np.ndarray:
    """Each row signed so that its entry of largest magnitude is positive (scikit-learn's rule)."""
    return rows * np.sign(rows[np.arange(len(rows)), np.abs(rows).argmax(axis=1)])[:, None]


def fit_learned_whitening(descriptors: np.ndarray, anchors: np.ndarray, positives: np.ndarray, dim: int,
                          shrinkage: float = LW_SHRINKAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Learned whitening (Mikolajczyk & Matas, ICCV 2007; Radenovic et al., ECCV 2016): centre on the
    mean of ``descriptors`` (N, D); whiten by the covariance of the matching differences
    ``anchors - positives`` (M, D), so that the directions in which a point's two views differ shrink
    and the others grow; then rotate onto the principal axes of the whitened descriptors and keep the
    top ``dim``. Returns ``(components (dim, D), mean (D,))`` in ``fit_pca``'s format, for the same head.

    ``shrinkage`` adds that multiple of the mean eigenvalue to the difference covariance's eigenvalues
    before inverting (a ridge), because a few thousand positives estimate its small eigenvalues poorly."""
    x = np.asarray(descriptors, np.float64)
    diff = np.asarray(anchors, np.float64) - np.asarray(positives, np.float64)
    if x.ndim != 2 or diff.ndim != 2 or diff.shape[1] != x.shape[1]:
        raise ValueError(f"fit_learned_whitening expects (N, D) descriptors and (M, D) anchors/positives, got "
                         f"{x.shape}, {np.shape(anchors)} and {np.shape(positives)}")
    n, d = x.shape
    if len(diff) < 2:
        raise ValueError(f"learned whitening needs matching pairs to fit on, got {len(diff)}")
    if not 1 <= dim <= min(n, d):
        raise ValueError(f"dim must be in [1, min(N, D)] = [1, {min(n, d)}], got {dim}")
    if shrinkage < 0:
        raise ValueError(f"shrinkage must be >= 0, got {shrinkage}")
    mean = x.mean(axis=0)
    evals, evecs = np.linalg.eigh(diff.T @ diff / len(diff))
    evals = np.maximum(evals, 0.0) + shrinkage * max(evals.mean(), 0.0)
    if evals.min() <= 0:
        raise ValueError("learned whitening: the matching differences are all zero, or span fewer than D "
                         "dimensions with shrinkage 0; use shrinkage > 0 or more pairs")
    whiten = (evecs / np.sqrt(evals)) @ evecs.T  # C^-1/2, symmetric
    white = (x - mean) @ whiten.T
    w_evals, w_evecs = np.linalg.eigh(white.T @ white / max(n - 1, 1))
    rotation = _signed(w_evecs[:, np.argsort(w_evals)[::-1][:dim]].T)
    components = rotation @ whiten
    return torch.from_numpy(np.ascontiguousarray(components)).float(), torch.from_numpy(mean).float()
