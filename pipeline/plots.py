"""Figures of descriptor evaluations: ROC curves, distance histograms, FPR95 against PCA dimension,
matching accuracy against the pixel threshold, and grouped bar charts (one per HPatches task, FPR95
per pair construction).

Figures are built as ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot's global
state, so nothing needs a display and nothing leaks between calls. Every figure is ``FIGSIZE`` inches at
``DPI`` (a ``FIGSIZE * DPI`` pixel PNG through ``save_figure``).

The FPR95 marks use ``pipeline.metrics``' definition: the threshold is the smallest distance at which
the pairs with ``distance <= threshold`` include 95% of the positives (``fpr95_threshold``). Their
artists carry a ``gid`` (``"fpr95:<name>"`` on ROC curves, ``"fpr95_threshold"`` on histograms) so
that they can be found on the figure; so do the lines of ``mma_curve`` (``"mma:<name>"``) and the bar
groups of ``grouped_bars`` (``"bars:<name>"``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from pipeline.metrics import fpr_at_95_recall, roc_auc

FIGSIZE = (6.4, 4.8)
DPI = 100
RECALL = 0.95


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _as_pairs(distances, labels) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if d.shape != y.shape:
        raise ValueError(f"distances {d.shape} and labels {y.shape} differ in length")
    if y.all() or not y.any():
        raise ValueError("need both matching (label 1) and non-matching (label 0) pairs")
    return d, y


def fpr95_threshold(distances, labels, recall: float = RECALL) -> float:
    """The distance threshold at which ``fpr_at_95_recall`` counts its false positives."""
    d, y = _as_pairs(distances, labels)
    pos = np.sort(d[y])
    return float(pos[int(np.ceil(recall * len(pos))) - 1])


def roc_points(distances, labels) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr)`` of the rule "match iff distance <= t" over every distinct t (tied pairs
    enter together), starting at (0, 0)."""
    d, y = _as_pairs(distances, labels)
    order = np.argsort(d, kind="stable")
    d, y = d[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(d)), len(d) - 1]  # last index of each run of tied distances
    tp, fp = np.cumsum(y)[ends], np.cumsum(~y)[ends]
    return np.r_[0.0, fp / (~y).sum()], np.r_[0.0, tp / y.sum()]


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """ROC curves of several models on the same pairs (``name -> (distances, labels)``); each curve's
    FPR95 operating point is marked and its AUC and FPR95 are in the legend."""
    if not curves:
        raise ValueError("roc_figure needs at least one curve")
    fig, ax = _figure()
    for name, (distances, labels) in curves.items():
        fpr, tpr = roc_points(distances, labels)
        fpr95 = fpr_at_95_recall(distances, labels)
        t = fpr95_threshold(distances, labels)
        recall_at_t = float(np.mean(np.asarray(distances, dtype=np.float64)[np.asarray(labels).astype(bool)] <= t))
        (line,) = ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{name} (AUC {roc_auc(distances, labels):.3f}, FPR95 {fpr95:.1%})")
        ax.plot([fpr95], [recall_at_t], "o", color=line.get_color(), clip_on=False, zorder=3, gid=f"fpr95:{name}")
    ax.axhline(RECALL, color="0.6", linestyle=":", linewidth=1)
    ax.plot([0, 1], [0, 1], color="0.8", linestyle="--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate (recall)", title="ROC (o: FPR at 95% recall)")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def distance_histogram(distances, labels, title: str) -> Figure:
    """Distances of matching vs non-matching pairs (densities on shared bins) and the FPR95 threshold."""
    d, y = _as_pairs(distances, labels)
    t, fpr95 = fpr95_threshold(d, y), fpr_at_95_recall(d, y)
    fig, ax = _figure()
    bins = np.histogram_bin_edges(d, bins=min(60, max(10, int(np.sqrt(len(d))))))
    ax.hist(d[y], bins=bins, density=True, alpha=0.6, label=f"matching ({int(y.sum())})")
    ax.hist(d[~y], bins=bins, density=True, alpha=0.6, label=f"non-matching ({int((~y).sum())})")
    ax.axvline(t, color="k", linestyle="--", gid="fpr95_threshold", label=f"95% recall at d = {t:.3g} (FPR {fpr95:.1%})")
    ax.set(xlabel="descriptor distance", ylabel="density", title=title)
    ax.legend(fontsize="small")
    return fig


def pca_curve(dims: list[int], fpr95: list[float], baseline: float | None = None) -> Figure:
    """FPR95 against the PCA output dimension (log2 axis); ``baseline`` (the descriptor without PCA) as a
    horizontal line."""
    if len(dims) == 0 or len(dims) != len(fpr95):
        raise ValueError(f"need as many FPR95 values as dimensions (> 0), got {len(dims)} and {len(fpr95)}")
    order = np.argsort(dims)
    x, v = np.asarray(dims)[order], np.asarray(fpr95, dtype=np.float64)[order]
    fig, ax = _figure()
    ax.plot(x, v, "o-", label="with PCA")
    if baseline is not None:
        ax.axhline(baseline, color="0.4", linestyle="--", label=f"without PCA ({baseline:.1%})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(int(i)) for i in x])
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(xlabel="PCA dimension", ylabel="FPR95 (lower is better)", title="FPR95 against descriptor dimension")
    ax.legend(fontsize="small")
    return fig


def mma_curve(thresholds, curves: dict[str, np.ndarray], title: str = "Mean matching accuracy") -> Figure:
    """Mean matching accuracy against the reprojection threshold (px), one line per model
    (``name -> MMA at each threshold``), as D2-Net plots it."""
    x = np.asarray(thresholds, dtype=np.float64)
    if not curves or len(x) == 0:
        raise ValueError("mma_curve needs at least one model and one threshold")
    fig, ax = _figure()
    for name, values in curves.items():
        v = np.asarray(values, dtype=np.float64)
        if v.shape != x.shape:
            raise ValueError(f"{name}: {v.size} MMA values for {x.size} thresholds")
        ax.plot(x, v, "o-", markersize=3, label=name, gid=f"mma:{name}")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(xlim=(x.min(), x.max()), ylim=(0, 1), xlabel="reprojection threshold (px)", ylabel="MMA (higher is better)",
           title=title)
    ax.legend(fontsize="small")
    return fig


def grouped_bars(values: dict[str, dict[str, float]], title: str, ylabel: str,
                 errors: dict[str, dict[str, tuple[float, float]]] | None = None) -> Figure:
    """One group of bars per category (a construction, an HPatches difficulty, ...), one bar per model
    in each, coloured by model (``name -> {category: value}``, every model the same categories in the
    same order); ``errors``: ``(low, high)`` of each bar, drawn as an interval (a bootstrap interval)."""
    if not values:
        raise ValueError("grouped_bars needs at least one model")
    categories = list(next(iter(values.values())))
    for name, per in values.items():
        if list(per) != categories:
            raise ValueError(f"{name}: categories {list(per)}, expected {categories} (as the first model's)")
    fig, ax = _figure()
    x = np.arange(len(categories))
    width = 0.8 / len(values)
    for i, (name, per) in enumerate(values.items()):
        v = np.array([per[c] for c in categories], dtype=np.float64)
        err = None
        if errors is not None and name in errors:
            lo_hi = np.array([errors[name][c] for c in categories], dtype=np.float64)
            err = np.stack([v - lo_hi[:, 0], lo_hi[:, 1] - v]).clip(min=0)
        ax.bar(x + (i - (len(values) - 1) / 2) * width, v, width, yerr=err, capsize=2, label=name, gid=f"bars:{name}")
    ax.set_xticks(x, categories, rotation=30 if len(categories) > 4 else 0, ha="right" if len(categories) > 4 else "center")
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize="small")
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically: temp file + rename) and close it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would follow the file through os.replace
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        if "matplotlib.pyplot" in sys.modules:  # a figure made through pyplot is also held by it
            sys.modules["matplotlib.pyplot"].close(fig)
    return path
