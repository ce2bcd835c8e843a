"""Descriptor evaluation on labelled pairs: the one code path that training, registration,
promotion and the demo's table all use, so their FPR95 figures are comparable. Also the recipe
for fitting a PCA head on training descriptors, shared by training and the sweep's PCA search."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.data.stream import load_pairs
from pipeline.device import DevicePlan, plan_for
from pipeline.metrics import fpr_at_95_recall
from pipeline.models import fit_input, info_of
from pipeline.models.sift import SIFT as SiftBaseline  # noqa: F401  (the baseline's old import path)
from pipeline.pca import attach_pca, fit_learned_whitening, fit_pca

# The figure every stage ranks models by (lower is better): the key Ray reports, Tune and the
# checkpoint config sort on, and MLflow metric names derive from.
METRIC = "eval_fpr95"

# PCA heads are fitted on the descriptors of this many training pairs from the first shards: HardNet8's
# recipe, and the one the sweep's PCA search uses, so both give the same head for the same tower.
PCA_FIT_SHARDS = 2
PCA_FIT_PAIRS = 2048


@torch.no_grad()
def describe(
    model: nn.Module, patches: np.ndarray, plan: DevicePlan | None = None, batch_size: int | None = None, method: str = "forward"
) -> np.ndarray:
    """uint8 patches (N, P, P) -> descriptors (N, D) float32, in eval mode, resized to the
    model's input size when the patches differ (``method="embed"``: HardNet8's pre-PCA output; a
    foreign module, without ``info``, gets the patches at their own size)."""
    plan = plan or plan_for(use_gpu=False)
    batch_size = batch_size or plan.eval_batch_size
    was_training = model.training
    model.eval()
    fn = getattr(model, method)
    size = model.input_size if info_of(model) is not None else patches.shape[-1]
    out = []
    try:
        for start in range(0, len(patches), batch_size):
            x = plan.prepare_batch(torch.from_numpy(np.ascontiguousarray(patches[start : start + batch_size])).unsqueeze(1))
            with plan.eval_autocast():
                out.append(fn(fit_input(x, size)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def pair_distances(model: nn.Module, pairs: np.ndarray, plan: DevicePlan | None = None) -> np.ndarray:
    """uint8 pairs (N, 2, P, P) -> L2 distance between the two descriptors of each pair
    (a pair classifier's own ``distance`` on its features instead)."""
    n = len(pairs)
    desc = describe(model, np.concatenate([pairs[:, 0], pairs[:, 1]]), plan)
    info = info_of(model)
    if info is not None and info.kind == "pair_classifier":  # MatchNet: its metric network ranks pairs
        with torch.no_grad():
            return model.eval().distance(torch.from_numpy(desc[:n]), torch.from_numpy(desc[n:])).float().numpy()
    return np.linalg.norm(desc[:n] - desc[n:], axis=1)


def evaluate_pairs(model: nn.Module, pairs: np.ndarray, labels: np.ndarray, plan: DevicePlan | None = None) -> dict[str, float]:
    return {METRIC: fpr_at_95_recall(pair_distances(model, pairs, plan), labels)}


def pca_fit_pairs(train_urls: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The training pairs every head is fitted on: uint8 patches (2N, P, P), each pair's two views
    in turn (a0, b0, a1, b1, ...), and the N pair labels (1 = the same point)."""
    pairs, labels, _ = load_pairs(train_urls[:PCA_FIT_SHARDS], PCA_FIT_PAIRS)
    return pairs.reshape(-1, *pairs.shape[2:]), labels


def fit_descriptor_pca(
    model: nn.Module, train_urls: list[str], dim: int, plan: DevicePlan | None = None, method: str = "forward",
    fit: str = "pca",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(components, mean) of the head fitted on the model's descriptors of the first ``PCA_FIT_PAIRS``
    training pairs: a PCA (``fit="pca"``; ``method="embed"``: HardNet8's own head, fitted before its
    projection) or learned whitening (``fit="learned_whitening"``: the same descriptors, plus the
    differences of the positive pairs among them)."""
    if fit not in ("pca", "learned_whitening"):
        raise ValueError(f"fit: expected 'pca' or 'learned_whitening', got {fit!r}")
    patches, labels = pca_fit_pairs(train_urls)
    positive = labels == 1
    if fit == "learned_whitening" and positive.sum() < 2:
        raise ValueError(f"learned whitening: the first {len(labels)} training pairs of {train_urls[:PCA_FIT_SHARDS]} hold "
                         f"{int(positive.sum())} positive pairs; it needs matching pairs to fit on")
    desc = describe(model, patches, plan, method=method)
    if fit == "pca":
        return fit_pca(desc, dim)
    return fit_learned_whitening(desc, desc[0::2][positive], desc[1::2][positive], dim)


def pca_dimension_curve(
    model: nn.Module, train_patches: np.ndarray, pairs: np.ndarray, labels: np.ndarray, dims: list[int]
) -> list[tuple[int, float, tuple[torch.Tensor, torch.Tensor]]]:
    """FPR95 of the trained tower with a PCA head of each dimension, fitted on its own training
    descriptors: the PCA dimension searched without retraining. Returns (dim, FPR95, (components, mean))."""
    train_desc = describe(model, train_patches)
    curve = []
    for dim in sorted(d for d in dims if d < train_desc.shape[1]):
        components, mean = fit_pca(train_desc, dim)
        curve.append((dim, evaluate_pairs(attach_pca(model, components, mean), pairs, labels)[METRIC], (components, mean)))
    return curve
