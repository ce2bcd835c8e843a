"""patchflow: distributed training of learned local patch descriptors.

WebDataset shards -> Ray Train DDP workers -> Ray Tune sweeps -> MLflow tracking and registry.
"""

from __future__ import annotations

__all__ = ["load_descriptor"]


def load_descriptor(uri: str, tracking_uri: str | None = None):
    """Load a registered descriptor, e.g. ``load_descriptor("models:/patchflow-hardnet@champion")``."""
    from pipeline.registry import load_descriptor as _load

    return _load(uri, tracking_uri)
