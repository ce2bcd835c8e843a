"""PCA fitting (scikit-learn inside) against a brute-force eigendecomposition of the covariance, learned
whitening against the two properties that define it, and the projection kept as model buffers."""

import io
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.metrics import fpr_at_95_recall
from pipeline.models import create_model, model_info
from pipeline.pca import PCAProjection, attach_pca, fit_learned_whitening, fit_pca


def _data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    # Anisotropic, correlated, off-centre: distinct eigenvalues, a mean that matters.
    return (rng.normal(size=(n, d)) * np.linspace(3.0, 0.1, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


def brute_force_pca(x, dim):
    """The definition: the mean, and the top-``dim`` eigenvectors of the covariance matrix (one per row,
    by decreasing eigenvalue), each signed so that its entry of largest magnitude is positive."""
    mean = x.sum(axis=0) / len(x)
    cov = (x - mean).T @ (x - mean) / (len(x) - 1)
    evals, evecs = np.linalg.eigh(cov)
    top = evecs[:, np.argsort(evals)[::-1][:dim]].T
    return top * np.sign(top[np.arange(dim), np.abs(top).argmax(axis=1)])[:, None], mean


@pytest.mark.parametrize("n,d,dim", [(2000, 32, 8), (50, 64, 16), (300, 20, 20)])
def test_matches_the_covariance_eigenvectors(n, d, dim):
    x = _data(n, d)
    components, mean = fit_pca(x, dim)
    ref_components, ref_mean = brute_force_pca(x, dim)
    assert components.shape == (dim, d) and mean.shape == (d,)
    assert components.is_contiguous()  # a strided buffer would make a loaded copy differ in the last bits
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(components.numpy(), ref_components, atol=1e-4)  # signs included
    # The projection: centred, rotated onto the axes, re-normalised row by row.
    expected = (x - ref_mean) @ ref_components.T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = PCAProjection(components, mean)(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    torch.testing.assert_close(fit_pca(torch.from_numpy(x), dim)[0], components)  # tensor input too


def test_a_full_dimension_head_only_centres():
    """The demo's HardNet head (pca_dim = the descriptor's size): the distances it gives are those of the
    descriptors centred on the fitted mean and re-normalised, computed in numpy, because the rotation is
    orthonormal."""
    x = _data(600, 16)
    got = PCAProjection(*fit_pca(x, 16))(torch.from_numpy(x).float()).numpy()
    centred = x - x.mean(axis=0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(got[:300] - got[300:], axis=1),
                               np.linalg.norm(centred[:300] - centred[300:], axis=1), atol=1e-4)


def _matching_pairs(n=3000, d=24, seed=1):
    """Anchors and positives that differ mostly along a few nuisance directions of large variance (a
    viewpoint's effect), descriptors that vary most along other directions."""
    rng = np.random.default_rng(seed)
    anchors = _data(n, d, seed)
    nuisance = rng.normal(size=(3, d))
    positives = anchors + rng.normal(size=(n, 3)) * 2.0 @ nuisance + 0.1 * rng.normal(size=(n, d))
    return anchors, positives


@pytest.mark.parametrize("shrinkage", [0.0, 0.5])
def test_learned_whitening_whitens_the_differences_then_decorrelates(shrinkage):
    """Mikolajczyk & Matas's definition, checked as properties, not re-derived: the (shrunk) covariance of
    the matching differences becomes the identity, and the whitened descriptors' covariance is diagonal
    with decreasing variances; a smaller dim keeps the leading rows."""
    a, b = _matching_pairs()
    x = np.concatenate([a, b])
    d = x.shape[1]
    components, mean = fit_learned_whitening(x, a, b, d, shrinkage)
    p = components.double().numpy()
    np.testing.assert_allclose(mean.numpy(), x.mean(axis=0), rtol=1e-5, atol=1e-5)
    c_diff = (a - b).T @ (a - b) / len(a)
    c_diff += shrinkage * np.trace(c_diff) / d * np.eye(d)
    np.testing.assert_allclose(p @ c_diff @ p.T, np.eye(d), atol=1e-4)
    var = p @ np.cov(x.T) @ p.T
    np.testing.assert_allclose(var - np.diag(np.diag(var)), 0, atol=1e-3 * var.max())
    assert np.all(np.diff(np.diag(var)) <= 1e-6 * var.max())
    top, _ = fit_learned_whitening(x, a, b, 8, shrinkage)
    np.testing.assert_allclose(top.numpy(), components[:8].numpy(), rtol=1e-4, atol=1e-4)


def test_learned_whitening_ranks_matching_pairs_better_than_pca():
    """What it is for: when two views differ along directions in which descriptors also vary a lot, PCA
    keeps those directions and learned whitening shrinks them, so FPR95 on held-out pairs (negatives:
    other points' second views) drops."""
    a, b = _matching_pairs(4000)
    fit_a, fit_b, test_a, test_b = a[:2000], b[:2000], a[2000:], b[2000:]
    fit_x = np.concatenate([fit_a, fit_b])
    labels = np.r_[np.ones(2000), np.zeros(2000)]
    shuffled = np.roll(test_b, 1, axis=0)

    def fpr(components, mean):
        head = PCAProjection(components, mean)
        za, zb, zn = (head(torch.from_numpy(v).float()).numpy() for v in (test_a, test_b, shuffled))
        return fpr_at_95_recall(np.r_[np.linalg.norm(za - zb, axis=1), np.linalg.norm(za - zn, axis=1)], labels)

    pca, white = fpr(*fit_pca(fit_x, 24)), fpr(*fit_learned_whitening(fit_x, fit_a, fit_b, 24))
    assert white < 0.5 * pca, (white, pca)


def test_learned_whitening_rejects_bad_input():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="matching pairs"):
        fit_learned_whitening(x, x[:1], x[:1], 4)
    with pytest.raises(ValueError, match=r"dim must be in \[1, min\(N, D\)\] = \[1, 4\], got 5"):
        fit_learned_whitening(x, x, x + 1, 5)
    with pytest.raises(ValueError, match="span fewer than D dimensions with shrinkage 0"):  # all differences equal: rank 1
        fit_learned_whitening(x, x, x + 1, 4, shrinkage=0.0)
    with pytest.raises(ValueError, match="all zero"):  # views identical: nothing to whiten, whatever the ridge
        fit_learned_whitening(x, x, x, 4)


def test_rejects_bad_dim():
    with pytest.raises(ValueError, match="PCA dim"):
        fit_pca(np.zeros((10, 4)), 5)


def test_attach_pca_wraps_a_model_and_round_trips():
    torch.manual_seed(0)
    model = create_model("l2net").eval()
    with torch.no_grad():
        desc = model(torch.rand(200, 1, 32, 32))
    components, mean = fit_pca(desc, 24)
    wrapped = attach_pca(model, components, mean).eval()
    assert wrapped.descriptor_dim == 24 and wrapped.input_size == 32
    # the backbone's metadata, resized; no second head on top (l2net is unit-norm already)
    assert wrapped.info == replace(model_info("l2net"), descriptor_dim=24, pca="none")
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        out = wrapped(x)
        torch.testing.assert_close(out, torch.nn.functional.normalize((model(x) - mean) @ components.t(), dim=1))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    assert {"pca.components", "pca.mean"} <= set(wrapped.state_dict())
    buf = io.BytesIO()
    torch.save(wrapped.state_dict(), buf)
    buf.seek(0)
    other = attach_pca(create_model("l2net"), torch.zeros(24, 128), torch.zeros(128))
    other.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(other.eval()(x), out)


def test_attach_pca_refuses_mismatches():
    model = create_model("l2net")
    with pytest.raises(ValueError, match="128-d"):
        attach_pca(model, torch.zeros(8, 64), torch.zeros(64))
    classifier = torch.nn.Identity()
    classifier.info, classifier.descriptor_dim = model_info("matchnet"), 64  # MatchNet's metadata, without its build cost
    with pytest.raises(ValueError, match="pair_classifier"):
        attach_pca(classifier, torch.zeros(8, 64), torch.zeros(64))
