"""Image sequences + homographies -> pairs: exact geometry on synthetic sequences in both on-disk
layouts (HPatches 1.ppm/H_1_k, Oxford img1.png/H1tokp), and the real Oxford graf sequence."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import pipeline.data.sequences as seqmod
from pipeline.data.sequences import (find_sequences, laf_scale, map_frames, open_sequence, sequence_pairs,
                                     sequence_to_shards)
from pipeline.data.shards import SourceError, read_blocks, shard_paths, verify_shards

GRAF = Path(__file__).resolve().parents[1] / "data" / "oxford_graf"
H, W = 200, 240
SHIFT = (8, 16)  # image 2 = image 1 moved by (-8, -16): multiples of 8 keep pyramid levels aligned


def texture(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Blobs at several scales: plenty of DoG keypoints, float in [0, 1]."""
    rng = np.random.default_rng(seed)
    x = sum(ndimage.gaussian_filter(rng.standard_normal(shape), s) * s for s in (2.0, 4.0, 8.0))
    x = (x - x.min()) / (x.max() - x.min())
    return x


def save(path: Path, img: np.ndarray) -> None:
    Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), mode="L").save(path)


def write_hpatches_layout(d: Path, seed: int = 0) -> Path:
    """1.ppm; 2.ppm = translated; 3.ppm = rotated 90 degrees (exact pixel permutations)."""
    d.mkdir(parents=True)
    canvas = texture((H + 40, W + 40), seed)
    img1 = canvas[:H, :W]
    dx, dy = SHIFT
    img2 = canvas[dy : dy + H, dx : dx + W]  # img2(x, y) = img1(x + dx, y + dy)
    img3 = np.rot90(img1)  # img3[i, j] = img1[j, W - 1 - i]
    for k, img in ((1, img1), (2, img2), (3, img3)):
        save(d / f"{k}.ppm", img)
    (d / "H_1_2").write_text(f"1 0 {-dx}\n0 1 {-dy}\n0 0 1\n")
    (d / "H_1_3").write_text(f"0 1 0\n-1 0 {W - 1}\n0 0 1\n")
    return d


def write_oxford_layout(d: Path, seed: int = 1) -> Path:
    """img1.png; img2.pgm = img1 downscaled 2x by 2x2 averaging, H1to2p accordingly."""
    d.mkdir(parents=True)
    img1 = texture((H, W), seed)
    img2 = img1.reshape(H // 2, 2, W // 2, 2).mean((1, 3))
    save(d / "img1.png", img1)
    Image.fromarray(np.clip(np.rint(img2 * 255), 0, 255).astype(np.uint8)).save(d / "img2.pgm")
    (d / "H1to2p").write_text("5.0000000e-01 0 -2.5e-01\n0 5.0e-01 -2.5e-01\n0 0 1\n")
    return d


@pytest.fixture(scope="module")
def seqs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sequences")
    write_hpatches_layout(root / "hp_a")
    write_oxford_layout(root / "ox_b")
    write_hpatches_layout(root / "hp_c", seed=2)
    (root / "notes").mkdir()
    return root


@pytest.fixture
def no_jitter(monkeypatch):
    for k in ("position_jitter", "scale_jitter", "orientation_jitter_deg"):
        monkeypatch.setitem(seqmod.PARAMS, k, 0.0)


def patch_distance(pairs: np.ndarray) -> np.ndarray:
    return np.abs(pairs[:, 0].astype(np.float64) - pairs[:, 1]).mean((1, 2))


def test_layouts_and_discovery(seqs: Path) -> None:
    assert [p.name for p in find_sequences(seqs)] == ["hp_a", "hp_c", "ox_b"]
    a, b = open_sequence(seqs / "hp_a"), open_sequence(seqs / "ox_b")
    assert a.layout == "hpatches" and sorted(a.images) == [1, 2, 3] and a.homography_path(3).name == "H_1_3"
    assert b.layout == "oxford" and b.images[2].name == "img2.pgm" and b.homography_path(2).name == "H1to2p"
    assert find_sequences(GRAF) == [GRAF]  # the real data, vendored in data/oxford_graf


def test_jacobian_mapping_matches_finite_differences() -> None:
    hom = np.array([[0.88, 0.31, -39.4], [-0.18, 0.94, 153.2], [2e-4, -1.6e-5, 1.0]])  # graf's H1to2p
    lafs = np.array([[[5.0, 1.0, 300.0], [-2.0, 7.0, 200.0]], [[30.0, 0.0, 50.0], [0.0, 30.0, 400.0]]])
    mapped, ok = map_frames(lafs, hom)
    assert ok.all()

    def h(p):
        q = hom @ np.array([p[0], p[1], 1.0])
        return q[:2] / q[2]

    for laf, out in zip(lafs, mapped):
        c = laf[:, 2]
        np.testing.assert_allclose(out[:, 2], h(c), rtol=1e-12)
        eps = 1e-4
        jac = np.stack([(h(c + e) - h(c - e)) / (2 * eps) for e in np.eye(2) * eps], 1)
        np.testing.assert_allclose(out[:, :2], jac @ laf[:, :2], rtol=1e-6)


def test_mapped_patches_match_exactly_without_jitter(seqs: Path, no_jitter) -> None:
    pairs, labels, ids = sequence_pairs(seqs / "hp_a", targets=[2], max_keypoints=300)
    pos = labels == 1
    assert pos.sum() > 40 and pos.mean() == 0.5
    d = patch_distance(pairs)
    # translation by whole pixels: the image-2 frame samples exactly the same pixels
    assert d[pos].max() < 0.05, d[pos].max()
    assert d[~pos].min() > 5

    pairs, labels, _ = sequence_pairs(seqs / "hp_a", targets=[3], max_keypoints=300)
    d = patch_distance(pairs)
    # 90 degree rotation: the Jacobian turns the frame with the image, so the patches are the same
    assert d[labels == 1].max() < 0.05 and d[labels == 0].min() > 5

    pairs, labels, _ = sequence_pairs(seqs / "ox_b", max_keypoints=300)
    d = patch_distance(pairs)
    # 2x downscaled image: half-size frames sample the same content (up to resampling blur)
    assert d[labels == 1].max() < 4 and np.median(d[labels == 0]) > 20


def test_image1_pixels_are_bilinear_samples_of_the_frame(seqs: Path, no_jitter) -> None:
    seq = open_sequence(seqs / "hp_a")
    cor = seqmod._correspondences(seq, [2], 32, 300)
    img = seqmod.read_image(seq.images[1]).astype(np.float64)
    small = np.flatnonzero(laf_scale(cor.lafs1) < 15)  # pyramid level 0: sampled from the image itself
    assert small.size > 10
    u = (2 * np.arange(32) + 1) / 32 - 1
    for i in small[:10]:
        a, c = cor.lafs1[i, :, :2], cor.lafs1[i, :, 2]
        xy = c[:, None, None] + np.einsum("ij,jrc->irc", a, np.stack(np.meshgrid(u, u)))  # cell (r, c): A (u_c, u_r)
        ref = ndimage.map_coordinates(img, [xy[1], xy[0]], order=1, mode="nearest") * 255
        assert np.abs(cor.patches1[i] - ref).max() <= 1.0


def test_jitter_is_seeded_and_perturbs(seqs: Path) -> None:
    a = sequence_pairs(seqs / "hp_a", targets=[2], max_keypoints=300, n_pairs=60, seed=1)
    b = sequence_pairs(seqs / "hp_a", targets=[2], max_keypoints=300, n_pairs=60, seed=1)
    c = sequence_pairs(seqs / "hp_a", targets=[2], max_keypoints=300, n_pairs=60, seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    pairs, labels, ids = a
    assert pairs.shape == (60, 2, 32, 32) and labels.sum() == 30
    np.testing.assert_array_equal(ids[:, 0] == ids[:, 1], labels == 1)
    d = patch_distance(pairs)
    assert 0.5 < np.median(d[labels == 1]) < 0.5 * np.median(d[labels == 0])  # jittered, still alike


def test_shards_train_eval_both(seqs: Path, tmp_path: Path) -> None:
    m = sequence_to_shards([seqs / "hp_a", seqs / "ox_b"], tmp_path / "tr", split="both", eval_dirs=seqs / "hp_c",
                           max_keypoints=300, pairs_per_block=32, blocks_per_shard=2, progress=False)
    verify_shards(tmp_path / "tr")
    blocks = [b for p in shard_paths(tmp_path / "tr", "train") for b in read_blocks(p)]
    assert all(len(b) == 32 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 32
    for b in blocks:  # a point at most once per block, also in blocks spanning two sequences
        assert (b.labels == 1).all() and len(np.unique(b.ids[:, 0])) == len(b)
    ids = np.concatenate([b.ids[:, 0] for b in blocks])
    assert set(np.unique(ids >> 32)) == {0, 1}  # both train sequences, indices 0 and 1
    assert m["generator"]["train"]["pairs_per_sequence"][0] + m["generator"]["train"]["pairs_per_sequence"][1] \
        == m["splits"]["train"]["pairs"]

    ev = [b for p in shard_paths(tmp_path / "tr", "eval") for b in read_blocks(p)]
    ev_ids = np.concatenate([b.ids for b in ev])
    assert set(np.unique(ev_ids >> 32)) == {2}
    # the eval shards hold exactly sequence_pairs' arrays, for a folder of sequences too
    m1 = sequence_to_shards(seqs, tmp_path / "ev", pairs_per_sequence=20, max_keypoints=300, pairs_per_block=16,
                            progress=False)
    pairs, labels, ids = sequence_pairs(seqs, n_pairs=20, max_keypoints=300)
    got = [b for p in shard_paths(tmp_path / "ev", "eval") for b in read_blocks(p)]
    np.testing.assert_array_equal(np.concatenate([b.pairs for b in got]), pairs)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in got]), labels)
    np.testing.assert_array_equal(np.concatenate([b.ids for b in got]), ids)
    assert m1["splits"]["eval"]["positives"] * 2 == m1["splits"]["eval"]["pairs"] == len(labels) == 60
    assert [Path(p).name for p in m1["generator"]["eval"]["sequences"]] == ["hp_a", "hp_c", "ox_b"]
    np.testing.assert_array_equal(np.unique(ids >> 32), [0, 1, 2])
    first = sequence_pairs(seqs / "hp_a", n_pairs=20, max_keypoints=300)  # sequence 0 alone: the same pairs
    np.testing.assert_array_equal(first[0], pairs[:20])
    np.testing.assert_array_equal(first[2], ids[:20])


def test_bad_input_names_the_file(seqs: Path, tmp_path: Path) -> None:
    d = write_hpatches_layout(tmp_path / "s")
    (d / "H_1_3").unlink()
    with pytest.raises(SourceError, match=r"s/H_1_3: homography file not found"):
        sequence_pairs(d)
    with pytest.raises(SourceError, match=r"s/H_1_3: homography file not found"):
        sequence_to_shards(d, tmp_path / "o", progress=False)
    (d / "H_1_3").write_text("1 0 0\n0 1 x\n0 0 1\n")
    with pytest.raises(SourceError, match=r"s/H_1_3: expected 9 numbers"):
        sequence_pairs(d)
    (d / "H_1_3").write_text("1 0 0\n0 1 0\n")
    with pytest.raises(SourceError, match=r"s/H_1_3: expected 9 finite numbers"):
        sequence_pairs(d)
    with pytest.raises(SourceError, match=r"s/5.ppm: target image 5 not found"):
        sequence_pairs(d, targets=[2, 5])
    with pytest.raises(SourceError, match="not an image sequence"):
        open_sequence(seqs)
    with pytest.raises(SourceError, match="notes: neither an image sequence"):
        sequence_pairs(seqs / "notes")
    with pytest.raises(SourceError, match="notes: neither an image sequence"):
        find_sequences(seqs / "notes")
    with pytest.raises(ValueError, match="eval_dirs"):
        sequence_to_shards(seqs / "hp_a", tmp_path / "o", split="both", progress=False)
    with pytest.raises(SourceError, match="only 3 positive correspondences|positive correspondences"):
        sequence_pairs(seqs / "hp_a", n_pairs=10**6, max_keypoints=50)


@pytest.fixture(scope="module")
def graf_pairs():
    before = sorted((p.name, p.stat().st_mtime_ns) for p in GRAF.iterdir())
    out = sequence_pairs(GRAF, max_keypoints=800, seed=0)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in GRAF.iterdir()) == before  # read only
    return out


def test_real_graf_sequence(graf_pairs) -> None:
    pairs, labels, ids = graf_pairs
    n = len(labels)
    assert pairs.shape == (n, 2, 32, 32) and pairs.dtype == np.uint8
    assert labels.sum() * 2 == n and 1500 < n < 5 * 2 * 800  # up to 5 targets x kept keypoints, x2 for negatives
    np.testing.assert_array_equal(ids[:, 0] == ids[:, 1], labels == 1)
    assert ids.min() >= 0 and ids.max() < 800
    assert pairs.std() > 25  # real texture
    d = np.sqrt(((pairs[:, 0].astype(np.float64) - pairs[:, 1]) ** 2).sum((1, 2)))
    pos, neg = d[labels == 1], d[labels == 0]
    assert np.median(pos) < 0.6 * np.median(neg), (np.median(pos), np.median(neg))

    import kornia.feature as KF

    sift = KF.SIFTDescriptor(32, rootsift=True)
    with torch.no_grad():
        a, b = (sift(torch.from_numpy(pairs[:, i]).float()[:, None] / 255) for i in (0, 1))
    ds = (a - b).norm(dim=1).numpy()
    rng = np.random.default_rng(0)
    p, q = rng.choice(ds[labels == 1], 5000), rng.choice(ds[labels == 0], 5000)
    assert (p < q).mean() > 0.85  # SIFT ranks real positives above negatives (ROC AUC)


def test_circle_overlap_error_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(-3, 5, (400_000, 2))
    for d, a, b in [(0.0, 1, 1), (0.5, 1, 1), (1.0, 1, 2), (0.3, 1, 1.5), (2.5, 1, 1), (0.2, 2, 1)]:
        in_a = np.hypot(pts[:, 0], pts[:, 1]) <= a
        in_b = np.hypot(pts[:, 0] - d, pts[:, 1]) <= b
        expected = 1 - (in_a & in_b).sum() / (in_a | in_b).sum()
        assert seqmod.circle_overlap_error(d, a, b) == pytest.approx(expected, abs=0.01), (d, a, b)


def test_points_on_an_occluder_are_not_positives(tmp_path, caplog) -> None:
    """Image 2 = image 1 shifted, except its right half shows something else (a car in front of
    the wall): H maps those points geometrically fine, but the homography does not explain image 2
    there, so they are not positives; on the left half they are. The optional re-detection
    criterion drops them too."""
    d = write_hpatches_layout(tmp_path / "occluded")
    img2 = np.asarray(Image.open(d / "2.ppm"), np.float64) / 255
    img2[:, W // 2 :] = texture((H, W - W // 2), seed=9)
    save(d / "2.ppm", img2)
    seq = open_sequence(d)
    x2 = None
    caplog.set_level(logging.INFO, logger="pipeline.data.sequences")
    for redetect in (False, True):
        cor = seqmod._correspondences(seq, [2], 32, 2000, redetect=redetect)
        x2 = cor.lafs[2][:, 0, 2]
        left, right = x2 < W // 2 - 24, x2 > W // 2 + 24
        assert left.sum() > 20 and right.sum() > 20
        assert cor.valid[2][left].mean() > 0.6 and cor.valid[2][right].mean() < 0.15, (
            redetect, cor.valid[2][left].mean(), cor.valid[2][right].mean())
    # the user is told how many the check left out: about the right half's share
    logged = re.search(r"occluded: (\d+) of (\d+) \(point, image\) correspondences left out", caplog.text)
    assert logged and 0.3 < int(logged[1]) / int(logged[2]) < 0.7, caplog.text
    # geometry alone keeps both halves: it is the plane check that drops the occluder
    img1 = seqmod.read_image(seq.images[1])
    geometric = seqmod.correspondences("occluded", img1, {2: seqmod.read_image(seq.images[2])},
                                       {2: seqmod.read_homography(seq.homography_path(2))}, 32, 2000,
                                       plane_check=False)
    assert geometric.valid[2][x2 > W // 2 + 24].mean() > 0.6


def test_plane_check_is_not_an_appearance_filter() -> None:
    """Image 2 = image 1 zoomed out, rotated and tilted, then defocused, with other gamma, contrast
    and noise: every point the geometry keeps is still on the plane."""
    rng = np.random.default_rng(3)
    img1 = texture((H, W), seed=4).astype(np.float32)
    hom = np.array([[0.8, -0.25, 40.0], [0.2, 0.6, 30.0], [2e-4, -3e-4, 1.0]])
    from kornia.geometry.transform import warp_perspective

    img2 = warp_perspective(torch.from_numpy(img1)[None, None], torch.from_numpy(hom).float()[None], (H, W),
                            align_corners=True)[0, 0].numpy()
    img2 = ndimage.gaussian_filter(img2, 1.0) ** 1.5 * 0.6 + 0.1 + 0.02 * rng.standard_normal(img2.shape)
    img2 = np.clip(img2, 0, 1).astype(np.float32)
    geometric = seqmod.correspondences("s", img1, {2: img2}, {2: hom}, 32, 500, plane_check=False)
    checked = seqmod.correspondences("s", img1, {2: img2}, {2: hom}, 32, 500)
    n = geometric.valid[2].sum()
    assert n > 30
    assert checked.valid[2].sum() >= 0.9 * n and not (checked.valid[2] & ~geometric.valid[2]).any()


def test_plane_ncc_matches_brute_force(monkeypatch) -> None:
    """The NCC map at interior pixels = the Gaussian-weighted correlation summed out by hand."""
    monkeypatch.setitem(seqmod.PARAMS, "plane_blur_sigma", 0.0)
    rng = np.random.default_rng(0)
    a = texture((H, W), seed=5)
    b = 0.5 * a + 0.5 * texture((H, W), seed=6) + 0.05 * rng.standard_normal((H, W))
    ncc = seqmod.plane_ncc(a, b, np.eye(3))
    s = seqmod.PARAMS["plane_window_sigma"]
    r = int(4 * s)
    t = np.arange(-r, r + 1)
    w = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * s * s))
    for y, x in [(100, 120), (60, 70), (140, 180)]:
        pa, pb = a[y - r : y + r + 1, x - r : x + r + 1], b[y - r : y + r + 1, x - r : x + r + 1]
        ma, mb = (w * pa).sum() / w.sum(), (w * pb).sum() / w.sum()
        expected = (w * (pa - ma) * (pb - mb)).sum() / np.sqrt((w * (pa - ma) ** 2).sum() * (w * (pb - mb) ** 2).sum())
        assert ncc[y, x] == pytest.approx(expected, abs=2e-3), (y, x)
    assert 0.3 < ncc[100, 120] < 0.95  # a partial correlation, not a trivial 0 or 1
    assert seqmod.plane_ncc(a, a, np.eye(3))[100, 120] == pytest.approx(1.0, abs=1e-6)


def test_graf_plane_check_drops_the_car() -> None:
    """Graf's lower fifth (below y ~ 520 in img1) is a car parked in front of the wall: the check
    drops most (point, image) candidates there and keeps the wall, even at img6's 60 degrees."""
    seq = open_sequence(GRAF)
    ks = [2, 3, 4, 5, 6]
    img1 = seqmod.read_image(seq.images[1])
    images = {k: seqmod.read_image(seq.images[k]) for k in ks}
    homs = {k: seqmod.read_homography(seq.homography_path(k)) for k in ks}
    geometric = seqmod.correspondences("graf", img1, images, homs, 32, 800, plane_check=False)
    checked = seqmod.correspondences("graf", img1, images, homs, 32, 800)
    y = geometric.lafs1[:, 1, 2]
    car, wall = y > 540, y < 450
    count = lambda cor, m: sum(int(cor.valid[k][m].sum()) for k in ks)  # noqa: E731
    assert count(checked, car) < 0.4 * count(geometric, car), (count(checked, car), count(geometric, car))
    assert count(checked, wall) > 0.97 * count(geometric, wall)
    assert checked.valid[6][wall].mean() > 0.9


def test_duplicate_frames_dropped_as_the_greedy_definition_says():
    """``_drop_duplicates`` (k-d tree candidates) keeps exactly what the plain greedy loop keeps:
    strongest first, a frame goes when a kept stronger one is near and of similar scale."""
    from pipeline.data.sequences.detection import _drop_duplicates
    from pipeline.data.sequences.frames import laf_scale
    from pipeline.data.sequences.params import PARAMS

    def greedy(lafs):
        c, s = lafs[:, :, 2], laf_scale(lafs)
        keep = []
        for i in range(len(lafs)):
            clash = [k for k in keep if np.linalg.norm(c[k] - c[i]) < PARAMS["duplicate_distance"] * max(s[k], s[i])
                     and max(s[k], s[i]) / min(s[k], s[i]) < PARAMS["duplicate_scale_ratio"]]
            if not clash:
                keep.append(i)
        return lafs[keep]

    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 50, 300):
        lafs = np.zeros((n, 2, 3))
        angle = rng.uniform(-np.pi, np.pi, n)
        scale = rng.uniform(1, 8, n)
        lafs[:, 0, 0], lafs[:, 0, 1] = scale * np.cos(angle), -scale * np.sin(angle)
        lafs[:, 1, 0], lafs[:, 1, 1] = scale * np.sin(angle), scale * np.cos(angle)
        lafs[:, :, 2] = rng.uniform(0, 40, (n, 2))  # crowded: many clashes, chains of them
        expected = greedy(lafs)
        assert np.array_equal(_drop_duplicates(lafs), expected)
        if n >= 50:
            assert 0 < len(expected) < n


@pytest.mark.parametrize("name", ["dog", "harris", "hessian"])
def test_detection_in_two_stages_is_kornias_detector_and_shares_its_scale_space(name):
    """``_detect`` runs kornia's ScaleSpaceDetector in two stages (the scale-space search memoised per
    image, detector and radius; then the orientation) so that constructions of one image share the
    search. Its frames are exactly what one ``ScaleSpaceDetector(..., ori_module=...)`` call gives,
    upright and oriented, at both radii; and a second construction of the image skips the search."""
    import kornia.feature as KF
    from kornia.geometry.subpix import ConvQuadInterp3d
    from kornia.geometry.transform import ScalePyramid

    from pipeline.data.sequences import detection
    from pipeline.data.sequences.frames import _to_tensor, frames_inside

    def one_call(img, n, upright, mr_size):  # kornia's forward, as detection did it before the split
        scale_space = name == "dog"
        response = {"dog": KF.BlobDoG, "harris": lambda: KF.CornerHarris(0.04), "hessian": KF.BlobHessian}[name]()
        detector = KF.ScaleSpaceDetector(
            n, mr_size=mr_size, resp_module=response, subpix_module=ConvQuadInterp3d(),
            scale_pyr_module=ScalePyramid(3, 1.6, 32, double_image=True, extra_levels=3 if scale_space else 2),
            ori_module=KF.PassLAF() if upright else KF.LAFOrienter(19),
            scale_space_response=scale_space, minima_are_also_good=scale_space)
        with torch.no_grad():
            lafs, resp = detector(_to_tensor(img))
        lafs, resp = lafs[0].double().numpy(), resp[0].abs().double().numpy()
        filled = np.abs(lafs).reshape(len(lafs), -1).sum(1) > 0
        lafs = lafs[filled][np.argsort(-resp[filled], kind="stable")]
        return lafs[frames_inside(lafs, img.shape)]

    img = texture((H, W), seed=3)
    detection._SCALE_SPACE_MEMO.clear()
    searches = []  # new memo entries per call: 1 = a scale-space search ran
    for mr_size in (6.0, 5.0):
        for upright in (True, False):
            before = len(detection._SCALE_SPACE_MEMO)
            got = detection._detect(img, 300, name, upright, mr_size)
            searches.append(len(detection._SCALE_SPACE_MEMO) - before)
            expected = one_call(img, 300, upright, mr_size)
            assert len(got) > 50 and np.array_equal(got, expected), (mr_size, upright)
    assert searches == [1, 0, 1, 0]  # upright then oriented at one radius: one search
    # the memo is keyed by the pixels, not the array object: a changed image is searched anew
    other = img.copy()
    other[0, 0] = 1.0 - other[0, 0]
    detection._detect(other, 300, name, False, 6.0)
    assert len(detection._SCALE_SPACE_MEMO) == 3
