"""PhotoTour conversion on tiny fixtures in the exact raw (bmp tiles + txt) and torchvision (.pt) formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.phototour import (load_phototour, phototour_eval_pairs, phototour_to_shards, read_matches,
                                     resize_patches)
from pipeline.data.shards import SourceError, load_manifest, read_blocks, shard_paths, verify_shards

N = 300  # two tiles: 256 + 44 patches, the second one mostly blank


def make_dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random patches (every one distinct), point ids in groups of 1-4, and m50 pairs."""
    rng = np.random.default_rng(seed)
    patches = rng.integers(0, 256, (N, 64, 64), dtype=np.uint8)
    sizes = []
    while sum(sizes) < N:
        sizes.append(int(rng.integers(1, 5)))
    sizes[-1] -= sum(sizes) - N
    sizes = [s for s in sizes if s > 0]
    point_ids = np.repeat(1000 + 7 * np.arange(len(sizes)), sizes).astype(np.int64)  # not 0..n: ids kept as is
    # 60 pairs: positives within groups, negatives across, in a scrambled file order
    pos = [(i, j) for i in range(N) for j in range(i + 1, min(i + 4, N)) if point_ids[i] == point_ids[j]][:30]
    neg = [(int(a), int(b)) for a, b in rng.integers(0, N, (80, 2)) if point_ids[a] != point_ids[b]][:30]
    matches = np.array(pos + neg, np.int64)[rng.permutation(60)]
    return patches, point_ids, matches


def write_raw(folder: Path, patches: np.ndarray, point_ids: np.ndarray, matches: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    n_tiles = -(-len(patches) // 256)
    for t in range(n_tiles):
        tile = np.zeros((1024, 1024), np.uint8)
        for k in range(min(256, len(patches) - 256 * t)):
            r, c = divmod(k, 16)
            tile[r * 64 : r * 64 + 64, c * 64 : c * 64 + 64] = patches[256 * t + k]
        Image.fromarray(tile, mode="L").save(folder / f"patches{t:04d}.bmp")
    (folder / "info.txt").write_text("".join(f"{p} 0\n" for p in point_ids))
    (folder / "interest.txt").write_text("".join(f"{i} 10.0 20.0 1.5 0.0 0.0\n" for i in range(len(patches))))
    lines = [f"{a} {point_ids[a]} 0 {b} {point_ids[b]} 0\n" for a, b in matches]
    (folder / "m50_100000_100000_0.txt").write_text("".join(lines))
    (folder / "m50_1000_1000_0.txt").write_text("".join(lines[::-1][:20]))
    return folder


def write_pt(path: Path, patches: np.ndarray, point_ids: np.ndarray, matches: np.ndarray) -> Path:
    is_match = (point_ids[matches[:, 0]] == point_ids[matches[:, 1]]).astype(np.int64)
    torch.save((torch.from_numpy(patches), torch.from_numpy(point_ids),
                torch.from_numpy(np.c_[matches, is_match])), path)
    return path


@pytest.fixture(scope="module")
def data():
    return make_dataset()


@pytest.fixture(scope="module")
def raw(tmp_path_factory, data) -> Path:
    return write_raw(tmp_path_factory.mktemp("ubc") / "liberty", *data)


def load(out: Path, split: str):
    blocks = [b for p in shard_paths(out, split) for b in read_blocks(p)]
    return blocks, (np.concatenate([b.pairs for b in blocks]), np.concatenate([b.labels for b in blocks]),
                    np.concatenate([b.ids for b in blocks]))


KW = dict(train_pairs=100, pairs_per_block=16, blocks_per_shard=2, progress=False)


def test_raw_64_pixels_ids_labels_unchanged(raw: Path, data, tmp_path: Path) -> None:
    patches, point_ids, matches = data
    m = phototour_to_shards(raw, tmp_path, patch_size=64, **KW)
    verify_shards(tmp_path)
    assert load_manifest(tmp_path)["splits"] == m["splits"] and m["source"] == "phototour" and m["patch_size"] == 64
    assert not (tmp_path / "manifest.partial.json").exists()

    # eval: exactly the m50 pairs, in file order, pixels untouched
    _, (pairs, labels, ids) = load(tmp_path, "eval")
    assert pairs.shape == (60, 2, 64, 64) and pairs.dtype == np.uint8
    np.testing.assert_array_equal(pairs[:, 0], patches[matches[:, 0]])
    np.testing.assert_array_equal(pairs[:, 1], patches[matches[:, 1]])
    np.testing.assert_array_equal(ids, point_ids[matches])
    np.testing.assert_array_equal(labels, (point_ids[matches[:, 0]] == point_ids[matches[:, 1]]).astype(np.uint8))
    assert labels.sum() == 30 == m["splits"]["eval"]["positives"]
    assert m["generator"]["eval"]["match_file"] == "m50_100000_100000_0.txt"

    # train: two distinct patches of one point per pair; a point at most once per block
    blocks, (pairs, labels, ids) = load(tmp_path, "train")
    assert [len(b) for b in blocks] == [16] * 6 + [4] and (labels == 1).all()
    index = {p.tobytes(): i for i, p in enumerate(patches)}
    a = np.array([index[p.tobytes()] for p in pairs[:, 0]])
    b = np.array([index[p.tobytes()] for p in pairs[:, 1]])
    assert (a != b).all()
    np.testing.assert_array_equal(point_ids[a], point_ids[b])
    np.testing.assert_array_equal(ids, np.stack([point_ids[a], point_ids[a]], 1))
    for block in blocks:
        assert len(np.unique(block.ids[:, 0])) == len(block)
    # every point with >= 2 patches is eligible, singletons never appear
    counts = {p: c for p, c in zip(*np.unique(point_ids, return_counts=True))}
    assert all(counts[p] >= 2 for p in ids[:, 0])
    assert len(np.unique(ids[:, 0])) > 40  # spread over many points, not a few


def test_resize_to_32_matches_independent_resizes(raw: Path, data, tmp_path: Path) -> None:
    patches, _, matches = data
    phototour_to_shards(raw, tmp_path, split="eval", **KW)
    _, (pairs, _, _) = load(tmp_path, "eval")
    assert pairs.shape == (60, 2, 32, 32)
    src = patches[matches[:, 0]].astype(np.int64)
    mean_2x2 = (src.reshape(-1, 32, 2, 32, 2).sum((2, 4)) + 2) // 4  # cv2 INTER_AREA / INTER_LINEAR at 2x
    np.testing.assert_array_equal(pairs[:, 0], mean_2x2)
    pil = np.stack([np.asarray(Image.fromarray(p).resize((32, 32), Image.BOX)) for p in patches[matches[:, 1]]])
    assert np.abs(pairs[:, 1].astype(int) - pil).max() <= 1  # PIL rounds between its two passes
    # the same on the torch side: area interpolation, rounded half up
    t = torch.nn.functional.interpolate(torch.from_numpy(patches[:5]).float()[:, None], size=32, mode="area")
    np.testing.assert_array_equal(resize_patches(patches[:5], 32), torch.floor(t[:, 0] + 0.5).numpy().astype(np.uint8))


def test_torchvision_pt_cache_gives_identical_shards(raw: Path, data, tmp_path: Path) -> None:
    pt = write_pt(tmp_path / "liberty.pt", *data)
    a = phototour_to_shards(raw, tmp_path / "raw", **KW)
    b = phototour_to_shards(pt, tmp_path / "pt", **KW)
    for split in ("train", "eval"):
        assert a["splits"][split] == b["splits"][split]  # same sha256 for every shard
    assert b["generator"]["train"]["format"] == "torchvision-pt"
    pairs, labels, ids = phototour_eval_pairs(pt, progress=False)
    _, ref = load(tmp_path / "raw", "eval")
    for x, y in zip((pairs, labels, ids), ref):
        np.testing.assert_array_equal(x, y)


def test_deterministic_and_rerun_rewrites_nothing(raw: Path, tmp_path: Path) -> None:
    m1 = phototour_to_shards(raw, tmp_path / "a", split="train", seed=3, **KW)
    stats = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.tar")}
    m2 = phototour_to_shards(raw, tmp_path / "a", split="train", seed=3, **KW)
    assert m1["splits"] == m2["splits"]
    assert stats == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.tar")}
    m3 = phototour_to_shards(raw, tmp_path / "b", split="train", seed=4, **KW)
    assert m3["splits"]["train"]["shards"][0]["sha256"] != m1["splits"]["train"]["shards"][0]["sha256"]
    assert list(m1["splits"]) == ["train"]


def test_other_match_file_and_eval_root(raw: Path, data, tmp_path: Path) -> None:
    patches, point_ids, matches = data
    other = write_raw(tmp_path / "notredame", *make_dataset(seed=1))
    m = phototour_to_shards(raw, tmp_path / "out", eval_root=other, match_file="m50_1000_1000_0.txt", **KW)
    _, (pairs, labels, ids) = load(tmp_path / "out", "eval")
    p2, pid2, m2 = make_dataset(seed=1)
    want = m2[::-1][:20]
    assert len(labels) == 20
    np.testing.assert_array_equal(pairs[:, 0], resize_patches(p2[want[:, 0]], 32))
    np.testing.assert_array_equal(ids, pid2[want])
    assert m["generator"]["eval"]["source"] == str(other.resolve())
    assert m["generator"]["train"]["source"] == str(raw.resolve())


def test_bad_inputs_name_the_file(raw: Path, data, tmp_path: Path) -> None:
    patches, point_ids, matches = data
    d = write_raw(tmp_path / "bad", *data)

    (d / "m50_100000_100000_0.txt").write_text("1 2 0 3 4 0\n5 6 0 7 8\n")
    with pytest.raises(SourceError, match=r"m50_100000_100000_0.txt:2: expected 6 integers"):
        read_matches(d / "m50_100000_100000_0.txt")
    with pytest.raises(SourceError, match=r"m50_100000_100000_0.txt:2"):
        phototour_to_shards(d, tmp_path / "o", **KW)

    a, b = matches[0]
    (d / "m50_100000_100000_0.txt").write_text(f"{a} {point_ids[a]} 0 {b} {point_ids[b] + 1} 0\n")
    with pytest.raises(SourceError, match=r"m50_100000_100000_0.txt:1: point ids .* disagree with info.txt"):
        load_phototour(d, progress=False)
    (d / "m50_100000_100000_0.txt").write_text(f"{a} {point_ids[a]} 0 {N} 5 0\n")
    with pytest.raises(SourceError, match=r"m50_100000_100000_0.txt:1: patch id out of range"):
        load_phototour(d, progress=False)
    with pytest.raises(SourceError, match="m50_9_9_0.txt: match file not found"):
        load_phototour(d, match_file="m50_9_9_0.txt", progress=False)

    Image.new("L", (1024, 512)).save(d / "patches0001.bmp")
    with pytest.raises(SourceError, match=r"patches0001.bmp: tile is 1024x512, expected 1024x1024"):
        load_phototour(d, need_matches=False, progress=False)
    (d / "patches0001.bmp").unlink()
    with pytest.raises(SourceError, match=r"patches0001.bmp: tile not found"):
        load_phototour(d, need_matches=False, progress=False)

    (d / "info.txt").write_text("12 0\nx 0\n")
    with pytest.raises(SourceError, match=r"info.txt:2: expected"):
        load_phototour(d, need_matches=False, progress=False)
    (d / "info.txt").unlink()
    with pytest.raises(SourceError, match=r"bad/info.txt: info.txt not found"):
        phototour_to_shards(d, tmp_path / "o", **KW)

    pt = tmp_path / "x.pt"
    torch.save((torch.zeros(3, 32, 32, dtype=torch.uint8), torch.zeros(3, dtype=torch.long),
                torch.zeros(1, 3, dtype=torch.long)), pt)
    with pytest.raises(SourceError, match=r"x.pt: data must be uint8 \(N, 64, 64\)"):
        load_phototour(pt)
    torch.save((torch.zeros(3, 64, 64, dtype=torch.uint8), torch.tensor([1, 1, 2]), torch.tensor([[0, 2, 1]])), pt)
    with pytest.raises(SourceError, match=r"x.pt: matches row 0 .* is_match=1"):
        load_phototour(pt)
    with pytest.raises(SourceError, match="match_file"):
        load_phototour(pt, match_file="m50_1000_1000_0.txt")


def test_too_few_points_for_a_block(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pairs_per_block=512 needs at least that many distinct 3D points"):
        phototour_to_shards(raw, tmp_path, split="train", train_pairs=600, pairs_per_block=512, progress=False)
