"""The model zoo: the registry (``pipeline.models.registry``) and one module per architecture.

Importing this package registers every architecture; tests and the sweep iterate over
``list_models()``, so adding an architecture is one module with a ``@register_model(name,
ModelInfo(...))`` class and one import line below.
"""

from __future__ import annotations

from pipeline.models.registry import (
    DescriptorModel,
    ModelInfo,
    check_patches,
    create_model,
    fit_input,
    info_of,
    list_models,
    model_info,
    model_options,
    register_model,
)

# Importing the modules registers their architectures.
from pipeline.models import hardnet, hardnet8, l2net, matchnet, siamese, sift, sosnet, tfeat  # noqa: E402,F401
from pipeline.models import opencv  # noqa: E402,F401  (OpenCV's baselines; cv2 is imported only to create one)

__all__ = ["DescriptorModel", "ModelInfo", "check_patches", "create_model", "fit_input", "info_of", "list_models",
           "model_info", "model_options", "register_model"]
