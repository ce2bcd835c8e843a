"""Descriptor evaluation on labelled pairs: the one code path that training, registration,
promotion and the demo's table all use, so their FPR95 figures are comparable."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.device import DevicePlan, plan_for
from pipeline.metrics import fpr_at_95_recall


@torch.no_grad()
def describe(
    model: nn.Module, patches: np.ndarray, plan: DevicePlan | None = None, batch_size: int | None = None, method: str = "forward"
) -> np.ndarray:
    """uint8 patches (N, P, P) -> descriptors (N, D) float32, in eval mode, resized to the
    model's input size when the patches differ (``method="embed"``: HardNet8's pre-PCA output)."""
    from pipeline.objectives import fit_input

    plan = plan or plan_for(use_gpu=False)
    batch_size = batch_size or plan.eval_batch_size
    was_training = model.training
    model.eval()
    fn = getattr(model, method)
    size = getattr(model, "input_size", patches.shape[-1])
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
    """uint8 pairs (N, 2, P, P) -> L2 distance between the two descriptors of each pair."""
    n = len(pairs)
    desc = describe(model, np.concatenate([pairs[:, 0], pairs[:, 1]]), plan)
    if getattr(model, "kind", "embedding") == "pair_classifier":  # MatchNet: its metric network ranks pairs
        with torch.no_grad():
            return model.eval().distance(torch.from_numpy(desc[:n]), torch.from_numpy(desc[n:])).float().numpy()
    return np.linalg.norm(desc[:n] - desc[n:], axis=1)


def evaluate_pairs(model: nn.Module, pairs: np.ndarray, labels: np.ndarray, plan: DevicePlan | None = None) -> dict[str, float]:
    return {"eval_fpr95": fpr_at_95_recall(pair_distances(model, pairs, plan), labels)}


class SiftBaseline(nn.Module):
    """kornia's differentiable SIFT descriptor (RootSIFT), the untrained baseline of every table.

    Shape: ``(B, 1, P, P) -> (B, 128)``.
    """

    def __init__(self, patch_size: int = 32) -> None:
        super().__init__()
        import kornia.feature

        self.sift = kornia.feature.SIFTDescriptor(patch_size=patch_size, rootsift=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.sift(patches)


def pca_dimension_curve(
    model: nn.Module, train_patches: np.ndarray, pairs: np.ndarray, labels: np.ndarray, dims: list[int]
) -> list[tuple[int, float, tuple[torch.Tensor, torch.Tensor]]]:
    """FPR95 of the trained tower with a PCA head of each dimension, fitted on its own training
    descriptors: the PCA dimension searched without retraining. Returns (dim, FPR95, (components, mean))."""
    from pipeline.pca import attach_pca, fit_pca

    train_desc = describe(model, train_patches)
    curve = []
    for dim in sorted(d for d in dims if d < train_desc.shape[1]):
        components, mean = fit_pca(train_desc, dim)
        curve.append((dim, evaluate_pairs(attach_pca(model, components, mean), pairs, labels)["eval_fpr95"], (components, mean)))
    return curve
