"""Image matching on sequences (HPatches-sequences protocol): mutual nearest neighbours and MMA
against plain loops, and a synthetic sequence with known homographies (kornia SIFT on real graf:
tests/test_evaluation.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.data.shards import SourceError
from pipeline.models import create_model
from pipeline.protocols import SIFT_NAME, evaluate_image_matching
from pipeline.protocols.matching import corner_error, mutual_nearest_neighbours



class RawPatch(nn.Module):
    """The patch itself, mean-removed and unit length: a descriptor that is right up to noise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return nn.functional.normalize(x - x.mean(1, keepdim=True), dim=1)


def loop_mnn(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int]]:
    def nearest(x, pool):
        best, arg = np.inf, -1
        for j, y in enumerate(pool):
            d = float(((x - y) ** 2).sum())
            if d < best:
                best, arg = d, j
        return arg

    return [(i, j) for i, x in enumerate(a) if nearest(b[(j := nearest(x, b))], a) == i]


@pytest.mark.parametrize("seed", range(4))
def test_mutual_nearest_neighbours_equal_a_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, (40, 3)).astype(np.float64)  # small integers: many tied distances
    b = rng.integers(0, 3, (35, 3)).astype(np.float64)
    assert mutual_nearest_neighbours(a, b, chunk=7).tolist() == [list(m) for m in loop_mnn(a, b)]
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(60, 8))
    assert mutual_nearest_neighbours(a, b).tolist() == [list(m) for m in loop_mnn(a, b)]
    assert mutual_nearest_neighbours(a[:0], b).shape == (0, 2)


def homography(angle_deg: float, scale: float, shift: tuple[float, float], persp: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c = np.array([[1, 0, -192], [0, 1, -192], [0, 0, 1.0]])  # about the image centre
    r = np.array([[scale * np.cos(a), -scale * np.sin(a), 0], [scale * np.sin(a), scale * np.cos(a), 0],
                  [persp[0], persp[1], 1.0]])
    t = np.array([[1, 0, 192 + shift[0]], [0, 1, 192 + shift[1]], [0, 0, 1.0]])
    return t @ r @ c


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, dict[int, np.ndarray]]:
    """Oxford layout: img1 = a photograph (384 x 384), img2 / img3 = it under known homographies."""
    from kornia.geometry.transform import warp_perspective
    from skimage import data

    folder = tmp_path_factory.mktemp("seq") / "synthetic"
    folder.mkdir()
    photo = data.camera()[64:448, 64:448]
    img1 = photo.astype(np.float32) / 255.0
    Image.fromarray(photo).save(folder / "img1.png")
    homs = {2: homography(12, 0.9, (6, -4), (1e-5, -2e-5)), 3: homography(-25, 1.15, (-10, 8), (-3e-5, 2e-5))}
    for k, h in homs.items():
        warped = warp_perspective(torch.from_numpy(img1)[None, None], torch.from_numpy(h).float()[None], (384, 384),
                                  mode="bilinear", align_corners=True)[0, 0].numpy()
        Image.fromarray(np.clip(np.round(warped * 255), 0, 255).astype(np.uint8)).save(folder / f"img{k}.png")
        (folder / f"H1to{k}p").write_text("\n".join(" ".join(f"{v:.12e}" for v in row) for row in h) + "\n")
    return folder, homs


def test_mma_equals_a_loop_and_good_descriptors_match(synthetic) -> None:
    folder, homs = synthetic
    res = evaluate_image_matching(folder, {"raw": RawPatch(), "matchnet": create_model("matchnet")},
                                  max_keypoints=600)
    assert res.sequences == ["synthetic"] and set(res.pairs) == {SIFT_NAME, "raw"}
    assert "pair classifier" in res.skipped["matchnet"]
    for name in res.pairs:
        per_pair = []
        for p in res.pairs[name]:
            h = np.loadtxt(folder / f"H1to{p.target}p")
            kp1, kpk = res.keypoints["synthetic"][1], res.keypoints["synthetic"][p.target]
            correct = [0] * 10
            for i, j in p.matches:
                x, y, w = h @ np.array([kp1[i][0], kp1[i][1], 1.0])
                err = np.hypot(kpk[j][0] - x / w, kpk[j][1] - y / w)
                for t in range(1, 11):
                    correct[t - 1] += err <= t
            per_pair.append([c / len(p.matches) for c in correct])
        assert res.mma(name) == pytest.approx(np.mean(per_pair, axis=0), abs=1e-12)
        assert len(res.pairs[name]) == 2 and res.mean_matches(name) > 100
        mma = dict(zip(res.thresholds, res.mma(name)))
        assert mma[3] > 0.8, (name, mma)  # right up to detector noise: most matches within 3 px
        # RANSAC on the matches finds the ground truth: image 1's corners within 3 px
        assert res.homography_accuracy(name)[3] == 1.0
    m = res.metrics()
    assert m["raw/mma/3px"] == res.mma("raw")[2] and "sift _kornia_/homography/5px" in m
    assert res.table().splitlines()[1].split()[:3] == ["model", "MMA@1px", "MMA@3px"]
    assert res.to_dict()["models"]["raw"]["pairs"][0]["target"] == 2


def test_corner_error_and_bad_input(synthetic, tmp_path: Path) -> None:
    _, homs = synthetic
    assert corner_error(homs[2], homs[2], (384, 384)) == 0.0
    shifted = np.array([[1, 0, 2.0], [0, 1, 0], [0, 0, 1]]) @ homs[2]
    assert corner_error(shifted, homs[2], (384, 384)) == pytest.approx(2.0)
    assert corner_error(None, homs[2], (384, 384)) == np.inf
    (tmp_path / "x").mkdir()
    with pytest.raises(SourceError, match="not an image sequence"):
        evaluate_image_matching(tmp_path, None)


def test_every_descriptor_sees_the_training_patches(synthetic, monkeypatch) -> None:
    """What matching feeds a descriptor is what training and the FPR95 pairs feed it: the same
    extract() cut of the same DoG frames (so image 1's patches equal sequence_pairs' for the same
    keypoint), as float [0, 1] (shards are uint8, prepare_batch divides by 255), in eval mode; and
    SIFT sees exactly the learned model's patches."""
    import pipeline.protocols.common as common
    from pipeline.data.sequences import detect_frames, extract, read_image, sequence_pairs
    from pipeline.models.hardnet import HardNet
    from pipeline.models.sift import SIFT

    seen: dict[str, list[tuple[torch.Tensor, bool]]] = {"sift": [], "hardnet": []}

    class SpySift(SIFT):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["sift"].append((x.clone(), self.training))
            return super().forward(x)

    class SpyHardNet(HardNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["hardnet"].append((x.clone(), self.training))
            return super().forward(x)

    monkeypatch.setattr(common, "SiftBaseline", SpySift)
    folder, _ = synthetic
    evaluate_image_matching(folder, {"hardnet": SpyHardNet().train()}, max_keypoints=300)
    fed = {n: torch.cat([x for x, _ in calls])[:, 0].contiguous() for n, calls in seen.items()}
    assert not any(training for calls in seen.values() for _, training in calls)  # dropout / BN off
    assert torch.equal(fed["sift"], fed["hardnet"])
    # images in the order the protocol describes them: 1, then 2..k
    expected = [extract(torch.from_numpy(img)[None, None], detect_frames(img, 300), 32)
                for img in (read_image(folder / f"img{k}.png") for k in (1, 2, 3))]
    assert fed["hardnet"].dtype == torch.float32
    assert torch.equal(fed["hardnet"], torch.from_numpy(np.concatenate(expected)).float() / 255.0)
    pairs, _, ids = sequence_pairs(folder, n_pairs=200, max_keypoints=300, seed=0)
    assert np.array_equal(pairs[:, 0], expected[0][ids[:, 0] & 0xFFFFFFFF])
