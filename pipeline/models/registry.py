"""The model registry, a leaf: what each architecture is, declared where it is registered.

Every architecture module registers its ``nn.Module`` class with a ``ModelInfo``::

    @register_model("hardnet", ModelInfo(input_size=32, descriptor_dim=128, default_loss="hardest_triplet",
                                         pca="attach", unit_norm=True))
    class HardNet(nn.Module): ...

and the rest of the pipeline asks the registry (``model_info``, ``model_options``, ``create_model``) or
an instance (``model.info``) instead of guessing conventions with ``getattr`` defaults. This module
imports nothing from the pipeline but ``pipeline.losses`` (for the loss names).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar, get_args

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses import LossName

Kind = Literal["embedding", "pair_classifier"]
# "attach": the pipeline can put a PCA head after the tower (``pipeline.models.pca_head``); "own": the
# model has its own, set by a ``pca_dim`` option and fitted on ``model.embed`` (HardNet8); "none":
# PCA does not apply (pair classifiers, fixed baselines).
PcaSupport = Literal["attach", "own", "none"]


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about an architecture.

    ``input_size`` / ``descriptor_dim`` are S and D of ``(B, 1, S, S) -> (B, D)`` with the default
    options; they become class attributes of the registered class, and a model whose sizes depend on
    its options (Siamese, SIFT, HardNet8's ``pca_dim``) sets its own per instance.
    ``kind``: "embedding" outputs are compared by L2 distance; a "pair_classifier"'s outputs are
    per-patch features that its ``score(f1, f2)`` turns into match logits.
    ``default_loss``: a name of ``pipeline.losses.LOSSES``; None exactly when not ``trainable``.
    ``unit_norm``: rows of the output have unit L2 norm.
    """

    input_size: int
    descriptor_dim: int
    default_loss: LossName | None
    pca: PcaSupport
    unit_norm: bool
    kind: Kind = "embedding"
    trainable: bool = True
    name: str = ""  # filled in by ``register_model``

    def check(self) -> None:
        """Raise ValueError when the declared fields contradict each other."""
        where = f"model {self.name!r}"
        if self.kind not in get_args(Kind):
            raise ValueError(f"{where}: kind must be one of {get_args(Kind)}, got {self.kind!r}")
        if self.pca not in get_args(PcaSupport):
            raise ValueError(f"{where}: pca must be one of {get_args(PcaSupport)}, got {self.pca!r}")
        if self.default_loss is not None and self.default_loss not in get_args(LossName):
            raise ValueError(f"{where}: default_loss must be one of {get_args(LossName)} or None, got {self.default_loss!r}")
        if self.trainable != (self.default_loss is not None):
            raise ValueError(f"{where}: a trainable model needs a default_loss, a fixed one must have none")
        if self.pca != "none" and (self.kind != "embedding" or not self.trainable):
            raise ValueError(f"{where}: PCA heads are for trainable embedding models; declare pca='none'")


class DescriptorModel(Protocol):
    """What every registered model (and ``pipeline.models.pca_head.PCAAttached``) provides."""

    info: ModelInfo
    input_size: int
    descriptor_dim: int

    def __call__(self, patches: torch.Tensor) -> torch.Tensor: ...


M = TypeVar("M", bound=type[nn.Module])
_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(name: str, info: ModelInfo):
    """Class decorator: register ``cls`` under ``name``; ``cls(**options)`` builds it.

    Sets ``cls.info`` (``info`` with its name) and the class defaults ``input_size`` and
    ``descriptor_dim``. A model declaring ``pca="own"`` must take a ``pca_dim`` option.
    """
    def wrap(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_model({name!r}) decorates an nn.Module class, got {cls!r}")
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        full = replace(info, name=name)
        full.check()
        if full.pca == "own" and "pca_dim" not in _options(cls):
            raise ValueError(f"model {name!r}: pca='own' needs a pca_dim option")
        cls.info = full
        cls.input_size = full.input_size
        cls.descriptor_dim = full.descriptor_dim
        _REGISTRY[name] = cls
        return cls

    return wrap


def _options(cls: type[nn.Module]) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items()}


def _lookup(name: str) -> type[nn.Module]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The metadata ``name`` was registered with (KeyError naming the registered models otherwise)."""
    return _lookup(name).info


def model_options(name: str) -> dict[str, Any]:
    """The keyword options ``create_model(name, ...)`` accepts, with their defaults."""
    return _options(_lookup(name))


def create_model(name: str, **options) -> nn.Module:
    return _lookup(name)(**options)


def info_of(model: nn.Module) -> ModelInfo | None:
    """The metadata a model carries (a registered one, or a head on one); None for a foreign module
    such as ``kornia.feature.HardNet()``, which evaluation treats as an embedding of patches at the
    size they come in. The one place that policy lives."""
    info = getattr(model, "info", None)
    return info if isinstance(info, ModelInfo) else None


# ---- input conventions shared by every model ---------------------------------------------------


def check_patches(patches: torch.Tensor, size: int, name: str) -> None:
    """Raise the same clear error from every model when the input is not (B, 1, size, size)."""
    if patches.ndim != 4 or tuple(patches.shape[1:]) != (1, size, size):
        raise ValueError(f"{name} expects patches of shape (B, 1, {size}, {size}), got {tuple(patches.shape)}")


def fit_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float patches to a model's input size (e.g. 32 px shards into MatchNet's 64 px)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
