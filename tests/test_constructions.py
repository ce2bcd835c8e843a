"""Pair constructions (issue 13): on a synthetic sequence with a known homography, every construction's
positives are true correspondences, upright frames stay upright, HPatches jitter has its overlap
levels (measured against the exact reprojection through H, by polygon clipping); the plane check
holds for all; on the real graf sequence each yields a sane number of pairs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sequences import GRAF, save, texture, write_hpatches_layout

import pipeline.data.sequences as seqmod
from pipeline.data.sequences import (CONSTRUCTIONS, ellipse_overlap, extract, laf_angle, laf_scale, map_frames,
                                     sequence_pairs, sequence_to_shards)
from pipeline.data.sequences.constructions import HPATCHES_LEVELS, median_jitter_overlap
from pipeline.data.shards import read_blocks, shard_paths

H, W, M = 240, 320, 64  # image size; margin of the canvas image k is rendered from (content everywhere)
# image 1 -> image 2: about the centre, zoom 0.8, rotation 25 degrees, foreshortening, perspective
_C = np.array([[1, 0, (W - 1) / 2], [0, 1, (H - 1) / 2], [0, 0, 1.0]])
_R = np.deg2rad(25)
HOM = _C @ np.array([[0.8 * np.cos(_R), -0.8 * np.sin(_R), 0], [0.7 * np.sin(_R), 0.7 * np.cos(_R), 0],
                     [4e-4, -3e-4, 1]]) @ np.linalg.inv(_C)


def _ring(n: int = 64) -> np.ndarray:
    a = np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _clip(subject: np.ndarray, clipper: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman: the part of convex polygon ``subject`` inside convex ``clipper`` (both CCW)."""
    out = subject
    for a, b in zip(clipper, np.roll(clipper, -1, 0)):
        if len(out) == 0:
            break
        inside = (b[0] - a[0]) * (out[:, 1] - a[1]) - (b[1] - a[1]) * (out[:, 0] - a[0]) >= 0
        pts = []
        for i in range(len(out)):
            p, q, p_in, q_in = out[i], out[(i + 1) % len(out)], inside[i], inside[(i + 1) % len(out)]
            if p_in:
                pts.append(p)
            if p_in != q_in:  # the edge crosses the clip line: add the crossing
                d1 = (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])
                d2 = (b[0] - a[0]) * (q[1] - a[1]) - (b[1] - a[1]) * (q[0] - a[0])
                pts.append(p + (q - p) * d1 / (d1 - d2))
        out = np.asarray(pts).reshape(-1, 2)
    return out


def _area(poly: np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _ccw(poly: np.ndarray) -> np.ndarray:
    x, y = poly[:, 0], poly[:, 1]
    return poly if np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)) > 0 else poly[::-1]


def polygon_overlap(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _ccw(a), _ccw(b)
    inter = _area(_clip(a, b))
    return inter / (_area(a) + _area(b) - inter)


def _warp(canvas: np.ndarray, hom: np.ndarray) -> np.ndarray:
    from kornia.geometry.transform import warp_perspective

    # image k (x) = image 1 (H^-1 x) = canvas (H^-1 x + M): warp the canvas by H T(-M)
    shift = np.array([[1, 0, -M], [0, 1, -M], [0, 0, 1.0]])
    return warp_perspective(torch.from_numpy(canvas).float()[None, None], torch.from_numpy(hom @ shift).float()[None],
                            (H, W), align_corners=True)[0, 0].numpy()


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    canvas = texture((H + 2 * M, W + 2 * M), seed=11).astype(np.float32)
    return canvas, canvas[M : M + H, M : M + W].copy(), _warp(canvas, HOM)


@pytest.fixture(scope="module")
def cors(scene) -> dict[str, seqmod.Correspondences]:
    _, img1, img2 = scene
    return {name: seqmod.correspondences("synthetic", img1, {2: img2}, {2: HOM}, 32, 400, construction=name)
            for name in CONSTRUCTIONS}


def _targets(cor: seqmod.Correspondences, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    pts = np.flatnonzero(cor.valid[2])
    return pts, cor.target_frames(pts, np.full(len(pts), 2), np.random.default_rng(seed))


@pytest.mark.parametrize("name", list(CONSTRUCTIONS))
def test_positives_are_true_correspondences(scene, cors, name: str) -> None:
    """The image-k patch of each positive, and image 1 sampled at that frame carried back through H^-1,
    show the same content; and the frame overlaps the point's image-1 frame (it is the same point)."""
    canvas, _, img2 = scene
    cor = cors[name]
    pts, frames2 = _targets(cor)
    assert len(pts) > 40, (name, len(pts))
    back, ok = map_frames(frames2, np.linalg.inv(HOM))
    assert ok.all()
    back[:, :, 2] += M  # image-1 coordinates -> canvas coordinates
    p2 = extract(torch.from_numpy(img2)[None, None], frames2, 32).astype(np.float64)
    p1 = extract(torch.from_numpy(canvas)[None, None], back, 32).astype(np.float64)
    same = np.abs(p2 - p1).mean((1, 2))
    other = np.abs(p2 - np.roll(p1, 7, 0)).mean((1, 2))
    assert np.median(same) < 0.25 * np.median(other), (name, np.median(same), np.median(other))
    back[:, :, 2] -= M
    overlap = ellipse_overlap(cor.lafs1[pts], back)
    assert np.median(overlap) > (0.5 if name == "hpatches-tough" else 0.7), (name, np.median(overlap))


def test_upright_frames_have_zero_orientation(cors) -> None:
    for name, cor in cors.items():
        pts, frames2 = _targets(cor)
        a = frames2[:, :, :2]
        if name.endswith("-upright"):
            for lafs in (cor.lafs1, frames2):  # image 1 and image k
                np.testing.assert_array_equal(laf_angle(lafs), 0.0)
                np.testing.assert_allclose(lafs[:, 0, 1], 0.0, atol=0)
                np.testing.assert_allclose(lafs[:, 1, 0], 0.0, atol=0)
            # the image-k scale is H's local scale of the image-1 frame (within the +-10 % jitter)
            local = laf_scale(map_frames(cor.lafs1[pts], HOM)[0]) / laf_scale(cor.lafs1[pts])
            ratio = laf_scale(frames2) / (laf_scale(cor.lafs1[pts]) * local)
            assert 1 / 1.1 - 1e-9 <= ratio.min() and ratio.max() <= 1.1 + 1e-9
            assert np.abs(a[:, 0, 0] - a[:, 1, 1]).max() < 1e-9  # isotropic
        else:  # oriented: the frames turn with the image (H rotates by ~25 degrees), not upright
            assert np.mean(np.abs(laf_angle(frames2)) > np.deg2rad(2)) > 0.8, name


def test_ellipse_overlap_matches_monte_carlo() -> None:
    rng = np.random.default_rng(1)
    a = np.array([[[3.0, 1.0, 10.0], [-0.5, 2.0, 5.0]], [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    b = np.array([[[2.5, -1.0, 11.0], [0.7, 2.5, 4.0]], [[1.0, 0.0, 2.5], [0.0, 3.0, 0.0]]])
    pts = rng.uniform(-10, 20, (1_000_000, 2))
    for la, lb, got in zip(a, b, ellipse_overlap(a, b, grid=256)):
        ina = np.linalg.norm((pts - la[:, 2]) @ np.linalg.inv(la[:, :2]).T, axis=1) <= 1
        inb = np.linalg.norm((pts - lb[:, 2]) @ np.linalg.inv(lb[:, :2]).T, axis=1) <= 1
        assert got == pytest.approx((ina & inb).sum() / (ina | inb).sum(), abs=0.01)


@pytest.mark.parametrize("level", list(HPATCHES_LEVELS))
def test_hpatches_overlap_levels(cors, level: str) -> None:
    """The jitter's median ellipse overlap is HPatches' level: on random frames (the calibration), and
    on this sequence's frames against the exact reprojection of the image-1 circle through H."""
    target, amplitude = HPATCHES_LEVELS[level]
    assert median_jitter_overlap(amplitude, n=4000, seed=5, grid=96) == pytest.approx(target, abs=0.01)
    cor = cors[f"hpatches-{level}"]
    pts, frames2 = _targets(cor, seed=3)
    ring = _ring()
    x = np.c_[(cor.lafs1[pts, None, :, 2] + ring[None] * laf_scale(cor.lafs1[pts])[:, None, None]).reshape(-1, 2),
              np.ones(len(pts) * len(ring))] @ HOM.T
    exact = (x[:, :2] / x[:, 2:]).reshape(len(pts), len(ring), 2)
    jittered = frames2[:, None, :, 2] + np.einsum("nij,kj->nki", frames2[:, :, :2], ring)
    overlaps = np.array([polygon_overlap(e, j) for e, j in zip(exact, jittered)])
    assert len(overlaps) > 40
    assert np.median(overlaps) == pytest.approx(target, abs=0.03), (level, np.median(overlaps))


def test_constructions_are_seeded_and_shards_match(tmp_path: Path) -> None:
    d = write_hpatches_layout(tmp_path / "s")
    for name in ("harris-upright", "hpatches-hard"):
        a = sequence_pairs(d, n_pairs=40, max_keypoints=200, seed=1, construction=name)
        b = sequence_pairs(d, n_pairs=40, max_keypoints=200, seed=1, construction=name)
        c = sequence_pairs(d, n_pairs=40, max_keypoints=200, seed=2, construction=name)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(a[0], c[0])
    m = sequence_to_shards(d, tmp_path / "ev", pairs_per_sequence=40, max_keypoints=200, seed=1, pairs_per_block=16,
                           progress=False, construction="hpatches-hard")
    got = [blk for p in shard_paths(tmp_path / "ev", "eval") for blk in read_blocks(p)]
    np.testing.assert_array_equal(np.concatenate([blk.pairs for blk in got]), a[0])
    assert m["generator"]["construction"]["name"] == "hpatches-hard"
    assert m["generator"]["construction"]["jitter"]["median_overlap"] == 0.72
    with pytest.raises(ValueError, match=re.escape("unknown pair construction 'sift-ish'")):
        sequence_pairs(tmp_path / "missing", construction="sift-ish")  # before touching the folder


@pytest.mark.parametrize("name", [n for n in CONSTRUCTIONS if n != "dog-oriented"])  # today's: test_sequences
def test_plane_check_applies_to_every_construction(tmp_path: Path, name: str) -> None:
    """Image 2 = image 1 shifted, but its right half shows something else: no positives there."""
    d = write_hpatches_layout(tmp_path / "occluded")
    img2 = np.asarray(Image.open(d / "2.ppm"), np.float64) / 255
    img2[:, 120:] = texture((200, 120), seed=9)
    save(d / "2.ppm", img2)
    cor = seqmod._correspondences(seqmod.open_sequence(d), [2], 32, 600, construction=name)
    x2 = cor.lafs[2][:, 0, 2]
    left, right = x2 < 120 - 24, x2 > 120 + 24
    assert left.sum() > 10 and right.sum() > 10, name
    assert cor.valid[2][left].mean() > 0.5 and cor.valid[2][right].mean() < 0.15, (
        name, cor.valid[2][left].mean(), cor.valid[2][right].mean())


@pytest.mark.parametrize("name", list(CONSTRUCTIONS))
def test_graf_pair_counts(name: str) -> None:
    """Real pairs: a sane number per construction, positives closer than negatives (img2, img4 and
    img6, 20 to 60 degrees of viewpoint change)."""
    pairs, labels, _ = sequence_pairs(GRAF, max_keypoints=500, seed=0, targets=[2, 4, 6], construction=name)
    assert labels.sum() * 2 == len(labels) and 600 < len(labels) <= 2 * 3 * 500, (name, len(labels))
    d = np.sqrt(((pairs[:, 0].astype(np.float64) - pairs[:, 1]) ** 2).sum((1, 2)))
    assert np.median(d[labels == 1]) < 0.8 * np.median(d[labels == 0]), name


# "detected" image-k frames (issue 13): the detector's own frame in image k, PhotoTour's criterion.

def _brute_best(mapped: np.ndarray, found: np.ndarray) -> np.ndarray:
    """For each mapped frame, a plain loop over every detection: the smallest overlap error among
    those passing PhotoTour's criterion (first on ties), -1 if none passes."""
    p = seqmod.PARAMS
    out = np.full(len(mapped), -1)
    for i in range(len(mapped)):
        best_err = np.inf
        for j in range(len(found)):
            d = np.linalg.norm(found[j, :, 2] - mapped[i, :, 2])
            err = float(seqmod.circle_overlap_error(d, laf_scale(mapped[i : i + 1])[0], laf_scale(found[j : j + 1])[0]))
            turn = abs((laf_angle(found[j : j + 1])[0] - laf_angle(mapped[i : i + 1])[0] + np.pi) % (2 * np.pi) - np.pi)
            if err <= p["max_overlap_error"] and turn <= np.deg2rad(p["max_orientation_difference_deg"]) + 1e-12 \
                    and err < best_err:
                out[i], best_err = j, err
    return out


def _laf(x: float, y: float, r: float, deg: float) -> np.ndarray:
    th = np.deg2rad(deg)
    return np.array([[r * np.cos(th), -r * np.sin(th), x], [r * np.sin(th), r * np.cos(th), y]])


def test_best_redetection_matches_brute_force(scene) -> None:
    """Hand-made frames (an orientation too far off, a closer but turned one, none near) and real
    detections in a warped image: the chosen detection is the brute-force one; ``redetected`` is
    exactly "some detection chosen"."""
    mapped = np.stack([_laf(50, 50, 10, 0), _laf(200, 100, 8, 90), _laf(120, 40, 6, -170)])
    found = np.stack([_laf(51, 50, 10, 40),  # nearest to frame 0 but turned 40 degrees: fails
                      _laf(54, 50, 10, 0), _laf(52, 50, 11, 25),  # both pass; the second overlaps more
                      _laf(120, 41, 6, 175), _laf(400, 400, 5, 0)])  # frame 2 across the +-180 wrap
    expected = _brute_best(mapped, found)
    np.testing.assert_array_equal(expected, [2, -1, 3])
    np.testing.assert_array_equal(seqmod.best_redetection(mapped, found), expected)
    np.testing.assert_array_equal(seqmod.best_redetection(mapped, found[:0]), [-1, -1, -1])
    _, img1, img2 = scene
    for name in ("dog-oriented-detected", "harris-upright-detected"):
        how = seqmod.get_construction(name)
        mapped, ok = how.carry(how.detect(img1, 60), HOM)
        found = how.detect(img2, 120)
        best = seqmod.best_redetection(mapped[ok], found)
        np.testing.assert_array_equal(best, _brute_best(mapped[ok], found))
        assert (best >= 0).sum() > 10, name
        np.testing.assert_array_equal(seqmod.redetected(mapped[ok], found), best >= 0)


@pytest.mark.parametrize("name", ["dog-oriented-detected", "harris-upright-detected"])
def test_detected_positives_are_image_k_detections(scene, name: str) -> None:
    """On a synthetic warp: positives exist, each one's image-k frame (what its patch is cut from) is
    one of image k's detections, the one that repeats the carried frame best, inside image k; and it
    shows the same content as image 1 there (a true correspondence)."""
    canvas, img1, img2 = scene
    how = seqmod.get_construction(name)
    cor = seqmod.correspondences("synthetic", img1, {2: img2}, {2: HOM}, 32, 400, construction=name)
    pts, frames2 = _targets(cor)
    assert len(pts) > 40, len(pts)
    found = how.detect(img2, 800)
    hit = (np.abs(frames2[:, None] - found[None]).max((2, 3)) == 0)
    assert hit.any(1).all()  # every positive's frame is exactly a detection
    carried, _ = how.carry(cor.lafs1[pts], HOM)
    np.testing.assert_array_equal(hit.argmax(1), seqmod.best_redetection(carried, found))
    assert seqmod.frames_inside(frames2, img2.shape).all()
    back, _ = map_frames(frames2, np.linalg.inv(HOM))
    back[:, :, 2] += M
    p2 = extract(torch.from_numpy(img2)[None, None], frames2, 32).astype(np.float64)
    p1 = extract(torch.from_numpy(canvas)[None, None], back, 32).astype(np.float64)
    same, other = np.abs(p2 - p1).mean((1, 2)), np.abs(p2 - np.roll(p1, 7, 0)).mean((1, 2))
    assert np.median(same) < 0.35 * np.median(other), (np.median(same), np.median(other))


def test_detected_construction_names_round_trip() -> None:
    for name, det, orientation in [("dog-oriented-detected", "dog", "oriented"),
                                   ("harris-upright-detected", "harris", "upright"),
                                   ("hessian-rotated-detected", "hessian", "rotated")]:
        how = seqmod.get_construction(name)
        assert (how.name, how.detectors, how.orientation, how.jitter) == (name, (det,), orientation, "detected")
        assert how.detected and how.level is None and seqmod.get_construction(how.name) == how
        params = how.params()
        assert params["name"] == name and params["jitter"]["detected"] is True
        assert "detector's own frame" in how.description
        assert how.room()[1] == 0.0
    assert not seqmod.get_construction("dog-oriented").detected
    with pytest.raises(ValueError, match="detected"):
        seqmod.get_construction("dog-detected")
