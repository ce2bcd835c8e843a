"""Model registry, in the style of timm's ``register_model`` / ``create_model``.

Every architecture registers a factory here; tests and the sweep iterate over ``list_models()``,
so adding an architecture is one decorator.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


# Importing the modules registers their architectures.
from pipeline.models import hardnet  # noqa: E402,F401


# ---- Conventions shared by every registered model -------------------------------------------------
# Every model class carries: ``input_size`` (S of its (B, 1, S, S) input), ``descriptor_dim`` (D of its
# (B, D) output), ``kind`` ("embedding": compare outputs by L2 distance; "pair_classifier": outputs are
# per-patch features that the model's ``score(f1, f2)`` turns into match logits), ``trainable`` and
# ``unit_norm`` (rows of the output have unit L2 norm).


import torch  # noqa: E402


def check_patches(patches: torch.Tensor, size: int, name: str) -> None:
    """Raise the same clear error from every model when the input is not (B, 1, size, size)."""
    if patches.ndim != 4 or tuple(patches.shape[1:]) != (1, size, size):
        raise ValueError(f"{name} expects patches of shape (B, 1, {size}, {size}), got {tuple(patches.shape)}")


from pipeline.models import hardnet8, l2net, matchnet, siamese, sift, sosnet, tfeat  # noqa: E402,F401

# The loss each architecture is trained with by default (names of ``pipeline.losses.LOSSES``; None =
# not trained). L2-Net's own loss (relative-distance softmax + compactness + intermediate-map terms) is
# not reproduced: it trains with the plain triplet margin loss on random in-batch negatives, which
# also makes it HardNet's ablation (same body, no hard mining). SOSNet's second-order regulariser is
# not included either: it trains with HardNet's loss.
DEFAULT_LOSS: dict[str, str | None] = {
    "hardnet": "hardest_triplet",
    "hardnet8": "hardest_triplet",
    "l2net": "triplet_random",
    "matchnet": "softmax_ce",
    "siamese": "contrastive",
    "sift": None,
    "sosnet": "hardest_triplet",
    "tfeat": "triplet_random",
}

from pipeline.models import opencv  # noqa: E402,F401  (after DEFAULT_LOSS: the baselines add their None)
