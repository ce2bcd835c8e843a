"""The UBC PhotoTour protocol as the HardNet paper reports it: FPR95 on each test scene's m50 pairs
(``m50_100000_100000_0.txt``, 100k pairs, half matching), rows = models, columns = test scenes, mean.

Each scene's patches are read once; the patches its pair file(s) name are described once per
model, and every pair's distance is taken from those descriptors. A scene folder without the 100k
file is evaluated on each m50 file it has (one column each). Every figure comes with a 95 %
percentile bootstrap interval over the pairs (``pipeline.metrics.bootstrap_interval``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from torch import nn

from pipeline.data.phototour import DEFAULT_MATCH_FILE, load_phototour
from pipeline.data.shards import SourceError
from pipeline.device import DevicePlan
from pipeline.evaluate import describe
from pipeline.metrics import BOOTSTRAP_RESAMPLES, bootstrap_interval, fpr_at_95_recall
from pipeline.protocols.common import metric_key, on_device, row_distances, text_table, with_sift

_M50 = re.compile(r"^m50_.*\.txt$")


def phototour_match_files(root: str | os.PathLike) -> list[str]:
    """The pair files a scene is evaluated on: ``m50_100000_100000_0.txt`` where present, else every
    ``m50_*.txt`` of the folder (sorted); torchvision's ``.pt`` cache holds the 100k pairs."""
    path = Path(root)
    if path.is_file() and path.suffix == ".pt":
        return [DEFAULT_MATCH_FILE]
    if not path.is_dir():
        raise SourceError(f"{path}: not found (expected a UBC PhotoTour folder or torchvision's <name>.pt cache)")
    if (path / DEFAULT_MATCH_FILE).is_file():
        return [DEFAULT_MATCH_FILE]
    found = sorted(p.name for p in path.iterdir() if _M50.match(p.name))
    if not found:
        raise SourceError(f"{path / DEFAULT_MATCH_FILE}: not found, and no other m50_*.txt pair file in {path}")
    return found


@dataclass
class PhotoTourColumn:
    """One test column: a scene and one of its pair files."""

    split: str
    path: str
    match_file: str
    pairs: int
    positives: int

    @property
    def label(self) -> str:
        return self.split if self.match_file == DEFAULT_MATCH_FILE else f"{self.split}:{self.match_file}"


@dataclass
class PhotoTourResult:
    """FPR95 per model and column, with bootstrap intervals; ``table()`` prints the paper's layout."""

    columns: list[PhotoTourColumn]
    fpr95: dict[str, list[float]] = field(default_factory=dict)  # model -> one figure per column
    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    bootstrap: int = BOOTSTRAP_RESAMPLES

    def mean(self, model: str) -> float:
        """The paper's "Mean" column: the plain mean over the test columns."""
        return float(np.mean(self.fpr95[model]))

    def table(self) -> str:
        """Rows: models; columns: test scenes, then their mean; FPR95 in % with [2.5 %, 97.5 %]."""
        rows = [["model"] + [c.label for c in self.columns] + ["mean"]]
        for name, values in self.fpr95.items():
            cells = [f"{100 * v:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]" for v, (lo, hi) in zip(values, self.intervals[name])]
            rows.append([name] + cells + [f"{100 * self.mean(name):.2f}"])
        pairs = ", ".join(f"{c.label}: {c.pairs} pairs ({c.match_file})" for c in self.columns)
        return text_table(rows, f"FPR95 (%) at 95 % recall, UBC PhotoTour m50 pairs; 95 % bootstrap interval "
                                f"({self.bootstrap} resamples) in brackets. {pairs}")

    def metrics(self) -> dict[str, float]:
        """Flat, MLflow-safe: ``<model>/<column>/fpr95`` (+ ``_low`` / ``_high``) and ``<model>/mean/fpr95``."""
        out = {}
        for name, values in self.fpr95.items():
            for c, v, (lo, hi) in zip(self.columns, values, self.intervals[name]):
                out[metric_key(name, c.label, "fpr95")] = v
                out[metric_key(name, c.label, "fpr95_low")] = lo
                out[metric_key(name, c.label, "fpr95_high")] = hi
            out[metric_key(name, "mean", "fpr95")] = self.mean(name)
        return out

    def to_dict(self) -> dict:
        return {"protocol": "phototour", "bootstrap": self.bootstrap,
                "columns": [vars(c) | {"label": c.label} for c in self.columns],
                "models": {n: {"fpr95": v, "intervals": [list(i) for i in self.intervals[n]], "mean": self.mean(n)}
                           for n, v in self.fpr95.items()}}


def _as_splits(splits: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | str | os.PathLike
               ) -> dict[str, Path]:
    if isinstance(splits, (str, os.PathLike)):
        splits = [splits]
    if isinstance(splits, Mapping):
        return {str(k): Path(v) for k, v in splits.items()}
    out: dict[str, Path] = {}
    for p in map(Path, splits):
        name = p.stem if p.suffix == ".pt" else p.name
        if name in out:
            raise ValueError(f"two PhotoTour splits named {name!r} ({out[name]} and {p}); pass a mapping name -> path")
        out[name] = p
    return out


def evaluate_phototour(splits: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | str | os.PathLike,
                       models: Mapping[str, nn.Module] | None, *, sift: bool = True, patch_size: int = 32,
                       match_files: Sequence[str] | None = None, bootstrap: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       plan: DevicePlan | None = None, progress: bool = False) -> PhotoTourResult:
    """FPR95 of every model (and kornia's SIFT first) on each scene's m50 pairs.

    ``splits``: scene folders (``liberty/``, ``notredame/``, ``yosemite/``) or torchvision ``.pt``
    caches, named by folder / file stem, or a mapping name -> path. ``match_files``: the pair files
    to use in every scene (default ``phototour_match_files``). Patches are resized to
    ``patch_size`` as ``pipeline.data.phototour`` does (area, 64 -> 32 = 2x2 mean); models whose
    ``input_size`` differs get them resized again by ``describe``.
    """
    named = _as_splits(splits)
    if not named:
        raise ValueError("no PhotoTour split given")
    rows = with_sift(models, patch_size, sift)
    result = PhotoTourResult(columns=[], bootstrap=bootstrap)
    per_model: dict[str, list[float]] = {n: [] for n in rows}
    per_model_ci: dict[str, list[tuple[float, float]]] = {n: [] for n in rows}
    for split, path in named.items():
        files = list(match_files) if match_files is not None else phototour_match_files(path)
        patches = None
        pair_sets = []
        for f in files:
            # (a folder without the 100k file but several m50 files has its tiles read once per file)
            pt_default = path.suffix == ".pt" and f == DEFAULT_MATCH_FILE
            ds = load_phototour(path, patch_size=patch_size, match_file=None if pt_default else f, progress=progress)
            if patches is None:
                patches = ds.patches
            pair_sets.append((ds.match_file, ds.match_patches, ds.match_labels))
            del ds
        # Each patch that any of the scene's pair files names is described once per model.
        used = np.unique(np.concatenate([mp.ravel() for _, mp, _ in pair_sets]))
        where = np.full(len(patches), -1, np.int64)
        where[used] = np.arange(len(used))
        for name, model in rows.items():
            desc = describe(on_device(model, plan), patches[used], plan)
            for _, mp, labels in pair_sets:
                d = row_distances(model, desc[where[mp[:, 0]]], desc[where[mp[:, 1]]])
                per_model[name].append(fpr_at_95_recall(d, labels))
                per_model_ci[name].append(bootstrap_interval(d, labels, fpr_at_95_recall, n=bootstrap, seed=seed))
        for file, _, labels in pair_sets:
            result.columns.append(PhotoTourColumn(split, str(path), file, int(len(labels)), int(labels.sum())))
    result.fpr95, result.intervals = per_model, per_model_ci
    return result


__all__ = ["PhotoTourColumn", "PhotoTourResult", "evaluate_phototour", "phototour_match_files"]
