"""What every protocol shares: the model list with SIFT first, distances between described
patches, text tables and MLflow-safe metric names."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.device import DevicePlan
from pipeline.evaluate import SiftBaseline
from pipeline.models import info_of

SIFT_NAME = "sift (kornia)"


def with_sift(models: Mapping[str, nn.Module] | None, patch_size: int, sift: bool = True) -> dict[str, nn.Module]:
    """kornia's SIFT first (the baseline row of every table), then ``models`` in the given order."""
    out: dict[str, nn.Module] = {SIFT_NAME: SiftBaseline(patch_size)} if sift else {}
    for name, model in (models or {}).items():
        if name in out:
            raise ValueError(f"model name {name!r} is taken by the SIFT baseline row; pass sift=False or rename it")
        out[name] = model
    if not out:
        raise ValueError("no model to evaluate: pass models or keep sift=True")
    return out


def on_device(model: nn.Module, plan: DevicePlan | None) -> nn.Module:
    """The model on the plan's device (``describe`` batches land there)."""
    return model.to(plan.device) if plan is not None else model


def is_pair_classifier(model: nn.Module) -> bool:
    """MatchNet-like: its own metric network, not the L2 distance, compares two descriptors."""
    info = info_of(model)
    return info is not None and info.kind == "pair_classifier"


@torch.no_grad()
def row_distances(model: nn.Module, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Distance between ``a[i]`` and ``b[i]`` (both (N, D)): L2 for embeddings, the metric network's
    ``distance`` for pair classifiers. float64 (N,)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} and {len(b)} descriptors: rows are compared pairwise")
    out = np.empty(len(a), np.float64)
    pair = is_pair_classifier(model)
    if pair:
        model.eval()
        device = next(model.parameters()).device
    for s in range(0, len(a), chunk):
        x, y = a[s : s + chunk], b[s : s + chunk]
        if pair:
            d = model.distance(torch.from_numpy(np.ascontiguousarray(x)).to(device),
                               torch.from_numpy(np.ascontiguousarray(y)).to(device))
            out[s : s + chunk] = d.float().cpu().numpy()
        else:
            out[s : s + chunk] = np.linalg.norm(x.astype(np.float64) - y.astype(np.float64), axis=1)
    return out


def text_table(rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    """Left-aligned columns, a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(([title] if title else []) + lines)


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(*parts: object) -> str:
    """An MLflow metric name from parts joined by '/': characters MLflow refuses become '_'
    (``metric_key("sift (kornia)", "liberty", "fpr95") == "sift _kornia_/liberty/fpr95"``)."""
    return "/".join(_UNSAFE.sub("_", str(p)) for p in parts)


__all__ = ["SIFT_NAME", "is_pair_classifier", "metric_key", "on_device", "row_distances", "text_table", "with_sift"]
