"""PhotoTour protocol on scenes written in the raw UBC layout (bmp tiles + info.txt + m50 files):
FPR95 against a brute-force reading of the pair file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.data.shards import SourceError
from pipeline.protocols import SIFT_NAME, evaluate_phototour, phototour_match_files
from test_phototour import make_dataset, write_raw


class RawPatch(nn.Module):
    """The patch itself as the descriptor (no resizing: no ``input_size``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def brute_fpr95(d: list[float], labels: list[int]) -> float:
    """Smallest threshold t (over the distances) with #{pos: d <= t} >= 0.95 #pos; FPR there."""
    pos = [x for x, y in zip(d, labels) if y]
    neg = [x for x, y in zip(d, labels) if not y]
    for t in sorted(set(d)):
        if sum(x <= t for x in pos) >= 0.95 * len(pos):
            return sum(x <= t for x in neg) / len(neg)
    raise AssertionError("unreachable")


def scene_pairs(folder: Path, match_file: str) -> tuple[list[np.ndarray], list[int]]:
    """Both patches (64x64 float, read from the bmp tiles) and the label of every line of an m50 file."""
    tiles = {}
    out, labels = [], []
    for line in (folder / match_file).read_text().splitlines():
        a, pa, _, b, pb, _ = map(int, line.split())
        patches = []
        for i in (a, b):
            t, k = divmod(i, 256)
            if t not in tiles:
                tiles[t] = np.asarray(Image.open(folder / f"patches{t:04d}.bmp"), np.float32)
            r, c = divmod(k, 16)
            patches.append(tiles[t][r * 64 : r * 64 + 64, c * 64 : c * 64 + 64] / 255.0)
        out.append(patches)
        labels.append(int(pa == pb))
    return out, labels


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ubc")
    out = {}
    for seed, name in enumerate(["liberty", "notredame"]):
        patches, point_ids, matches = make_dataset(seed)
        # A scene where same-point patches look alike, so FPR95 is neither 0 nor 1: each patch is
        # its point's base texture plus noise of a random strength.
        rng = np.random.default_rng(10 + seed)
        base = {p: rng.integers(0, 256, (64, 64)) for p in np.unique(point_ids)}
        patches = np.stack([np.clip(base[p] + rng.normal(0, rng.uniform(10, 200), (64, 64)), 0, 255)
                            for p in point_ids]).astype(np.uint8)
        out[name] = write_raw(root / name, patches, point_ids, matches)
    (out["notredame"] / "m50_100000_100000_0.txt").unlink()  # only m50_1000_1000_0.txt left there
    return out


def test_fpr95_is_the_brute_force_figure_of_the_pair_files(scenes) -> None:
    res = evaluate_phototour(scenes, {"raw": RawPatch()}, patch_size=64, bootstrap=50)
    assert [c.label for c in res.columns] == ["liberty", "notredame:m50_1000_1000_0.txt"]
    assert [c.pairs for c in res.columns] == [60, 20]
    assert list(res.fpr95) == [SIFT_NAME, "raw"]
    for col, (name, file) in enumerate([("liberty", "m50_100000_100000_0.txt"), ("notredame", "m50_1000_1000_0.txt")]):
        pairs, labels = scene_pairs(scenes[name], file)
        d = [float(np.sqrt(((a - b) ** 2).sum())) for a, b in pairs]
        want = brute_fpr95(d, labels)
        assert 0 < want < 1
        assert res.fpr95["raw"][col] == pytest.approx(want, abs=1e-12)
        lo, hi = res.intervals["raw"][col]
        assert lo <= hi and 0 <= lo and hi <= 1
        # SIFT through kornia on the same patches, described independently
        from kornia.feature import SIFTDescriptor

        sift = SIFTDescriptor(64, rootsift=True)
        with torch.no_grad():
            da = sift(torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None])
            db = sift(torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None])
        d_sift = torch.linalg.norm(da - db, dim=1).tolist()
        assert res.fpr95[SIFT_NAME][col] == pytest.approx(brute_fpr95(d_sift, labels), abs=1e-12)
    assert res.mean("raw") == pytest.approx(np.mean(res.fpr95["raw"]))

    table = res.table()
    assert table.splitlines()[1].split()[:4] == ["model", "liberty", "notredame:m50_1000_1000_0.txt", "mean"]
    assert f"{100 * res.fpr95['raw'][0]:.2f} [" in table
    m = res.metrics()
    assert m["raw/liberty/fpr95"] == res.fpr95["raw"][0] and "sift _kornia_/mean/fpr95" in m
    assert res.to_dict()["columns"][1]["match_file"] == "m50_1000_1000_0.txt"


def test_pair_classifier_ranks_pairs_with_its_metric_network(scenes) -> None:
    from pipeline.data.phototour import phototour_eval_pairs
    from pipeline.evaluate import pair_distances
    from pipeline.metrics import fpr_at_95_recall
    from pipeline.models import create_model

    torch.manual_seed(0)
    matchnet = create_model("matchnet")
    res = evaluate_phototour([scenes["liberty"]], {"matchnet": matchnet}, sift=False, patch_size=64, bootstrap=10)
    pairs, labels, _ = phototour_eval_pairs(scenes["liberty"], patch_size=64, progress=False)
    assert res.fpr95["matchnet"][0] == pytest.approx(fpr_at_95_recall(pair_distances(matchnet, pairs), labels))


def test_resized_patches_and_match_file_choice(scenes, tmp_path: Path) -> None:
    # 32 px (the default): each patch is the 2x2 mean of the 64 px one, described by the raw model.
    res = evaluate_phototour({"lib": scenes["liberty"]}, {"raw": RawPatch()}, sift=False, bootstrap=20)
    pairs, labels = scene_pairs(scenes["liberty"], "m50_100000_100000_0.txt")
    half = [[np.floor((255 * p).reshape(32, 2, 32, 2).sum((1, 3)) / 4 + 0.5) / 255 for p in pq] for pq in pairs]
    d = [float(np.sqrt(((a - b) ** 2).sum())) for a, b in half]
    assert res.fpr95["raw"][0] == pytest.approx(brute_fpr95(d, labels), abs=1e-9)

    assert phototour_match_files(scenes["liberty"]) == ["m50_100000_100000_0.txt"]  # the 100k file wins
    both = evaluate_phototour([scenes["liberty"]], {"raw": RawPatch()}, sift=False, patch_size=64, bootstrap=10,
                              match_files=["m50_100000_100000_0.txt", "m50_1000_1000_0.txt"])
    assert [c.label for c in both.columns] == ["liberty", "liberty:m50_1000_1000_0.txt"]
    with pytest.raises(SourceError, match="m50_9_9_0.txt: match file not found"):
        evaluate_phototour([scenes["liberty"]], None, match_files=["m50_9_9_0.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="m50_100000_100000_0.txt: not found, and no other m50"):
        phototour_match_files(tmp_path / "empty")
