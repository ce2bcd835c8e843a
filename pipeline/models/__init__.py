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
