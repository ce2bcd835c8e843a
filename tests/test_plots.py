"""pipeline.plots: every figure saves as a PNG of the expected size with something drawn on it, and the
FPR95 marks sit where a brute-force search over thresholds puts them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.metrics import fpr_at_95_recall, roc_auc
from pipeline.plots import (DPI, FIGSIZE, distance_histogram, fpr95_threshold, grouped_bars, mma_curve, pca_curve, roc_figure,
                           roc_points, save_figure)

SIZE = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))  # PIL's (width, height)


def _pairs(n: int = 400, separation: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distances of n/4 matching pairs (label 1) and 3n/4 non-matching pairs, rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n // 4, dtype=int), np.zeros(n - n // 4, dtype=int)]
    distances = np.round(np.abs(rng.normal(1.0 + separation * (1 - labels), 0.4)), 2)
    perm = rng.permutation(n)
    return distances[perm], labels[perm]


def _brute_force_fpr95(distances, labels) -> tuple[float, float]:
    """(threshold, FPR): the smallest candidate t with recall(d <= t) >= 95%, trying every distance."""
    d, y = np.asarray(distances, dtype=float), np.asarray(labels).astype(bool)
    for t in sorted(set(d.tolist())):
        if np.mean(d[y] <= t) >= 0.95:
            return t, float(np.mean(d[~y] <= t))
    raise AssertionError("unreachable")


def _check_png(path, tmp_path) -> None:
    assert path.parent == tmp_path and path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == SIZE
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.var() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def _gid(fig, gid):
    found = [a for a in fig.axes[0].get_children() if a.get_gid() == gid]
    assert len(found) == 1, gid
    return found[0]


@pytest.mark.parametrize("seed", range(5))
def test_fpr95_threshold_matches_brute_force(seed):
    d, y = _pairs(n=97 + seed * 31, seed=seed)
    t, fpr = _brute_force_fpr95(d, y)
    assert fpr95_threshold(d, y) == t
    assert fpr_at_95_recall(d, y) == pytest.approx(fpr)


def test_roc_points_agree_with_sklearn():
    from sklearn.metrics import roc_curve

    d, y = _pairs()
    fpr, tpr = roc_points(d, y)
    ref_fpr, ref_tpr, _ = roc_curve(y, -d, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def test_roc_figure(tmp_path):
    curves = {"good": _pairs(separation=1.5, seed=1), "weak": _pairs(separation=0.4, seed=2)}
    fig = roc_figure(curves)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for name, (d, y) in curves.items():
        t, fpr = _brute_force_fpr95(d, y)
        marker = _gid(fig, f"fpr95:{name}")
        assert marker.get_xdata()[0] == pytest.approx(fpr)
        assert marker.get_ydata()[0] == pytest.approx(np.mean(d[y == 1] <= t))
        assert any(s.startswith(name) and f"AUC {roc_auc(d, y):.3f}" in s for s in legend)
    _check_png(save_figure(fig, tmp_path / "roc.png"), tmp_path)


def test_distance_histogram(tmp_path):
    d, y = _pairs(seed=3)
    fig = distance_histogram(d, y, "HardNet on liberty")
    line = _gid(fig, "fpr95_threshold")
    assert line.get_xdata()[0] == pytest.approx(_brute_force_fpr95(d, y)[0])
    assert fig.axes[0].get_title() == "HardNet on liberty"
    _check_png(save_figure(fig, tmp_path / "hist.png"), tmp_path)


@pytest.mark.parametrize("baseline", [0.08, None])
def test_pca_curve(baseline, tmp_path):
    fig = pca_curve([128, 16, 32, 64], [0.05, 0.2, 0.12, 0.07], baseline)
    (line,) = [l for l in fig.axes[0].get_lines() if l.get_label() == "with PCA"]
    assert list(line.get_xdata()) == [16, 32, 64, 128] and list(line.get_ydata()) == [0.2, 0.12, 0.07, 0.05]
    assert len(fig.axes[0].get_lines()) == (2 if baseline is not None else 1)
    _check_png(save_figure(fig, tmp_path / "pca.png"), tmp_path)


def test_mma_curve(tmp_path):
    curves = {"sift": np.linspace(0.2, 0.6, 10), "hardnet": np.linspace(0.3, 0.8, 10)}
    fig = mma_curve(range(1, 11), curves)
    for name, values in curves.items():
        line = _gid(fig, f"mma:{name}")
        assert list(line.get_xdata()) == list(range(1, 11)) and np.allclose(line.get_ydata(), values)
    _check_png(save_figure(fig, tmp_path / "mma.png"), tmp_path)


def test_grouped_bars_heights_and_intervals(tmp_path):
    values = {"sift": {"Easy": 0.5, "Hard": 0.3, "Tough": 0.2}, "hardnet": {"Easy": 0.7, "Hard": 0.5, "Tough": 0.4}}
    errors = {"sift": {"Easy": (0.45, 0.6), "Hard": (0.3, 0.35), "Tough": (0.1, 0.2)}}
    fig = grouped_bars(values, "matching", "mAP", errors)
    ax = fig.axes[0]
    for name, per in values.items():
        bars = [p for p in ax.patches if p.get_gid() == f"bars:{name}"]
        assert [b.get_height() for b in bars] == list(per.values())
        # each model's bar sits in its category's group, left to right in the models' order
        assert [round(b.get_x() + b.get_width() / 2) for b in bars] == [0, 1, 2]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Easy", "Hard", "Tough"]
    (caps,) = [c for c in ax.containers if getattr(c, "has_yerr", False)]  # only sift has intervals
    segments = caps.lines[2][0].get_segments()
    assert [(s[0][1], s[1][1]) for s in segments] == [pytest.approx(v) for v in errors["sift"].values()]
    _check_png(save_figure(fig, tmp_path / "bars.png"), tmp_path)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="as many FPR95 values"):
        pca_curve([16, 32], [0.1])
    with pytest.raises(ValueError, match="both matching"):
        distance_histogram(np.ones(5), np.ones(5), "all positive")
    with pytest.raises(ValueError, match="at least one curve"):
        roc_figure({})
    with pytest.raises(ValueError, match="3 MMA values for 10 thresholds"):
        mma_curve(range(1, 11), {"sift": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match=r"hardnet: categories \['Easy'\], expected \['Easy', 'Hard'\]"):
        grouped_bars({"sift": {"Easy": 0.5, "Hard": 0.3}, "hardnet": {"Easy": 0.7}}, "t", "y")


def test_save_figure_closes_pyplot_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=FIGSIZE, dpi=DPI)
    fig.add_subplot().plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "sub" / "line.png")
    assert not plt.fignum_exists(fig.number)
    with Image.open(tmp_path / "sub" / "line.png") as img:
        assert img.size == SIZE
