"""HPatches conversion on a tiny release in the exact on-disk format (vertical png stacks of 65x65 patches)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.hpatches import (IMAGE_NAMES, OFFICIAL_SEQUENCES, OFFICIAL_SPLITS, hpatches_pairs,
                                    hpatches_to_shards, list_sequences, split_sequences)
from pipeline.data.shards import SourceError, read_blocks, shard_paths, verify_shards

SEQS = {"i_alpha": 5, "i_beta": 4, "v_delta": 3, "v_gamma": 6}  # name -> number of patches
SPLITS = {"s1": {"test": ["i_beta", "v_delta"]}, "s2": {"test": ["v_gamma"], "train": ["i_alpha"]}}

# hpatches-benchmark splits.json, split "a", train list (the complement of its test list)
OFFICIAL_A_TRAIN = [
    "v_there", "i_yellowtent", "i_boutique", "v_wapping", "i_leuven", "i_school", "i_crownnight", "v_artisans",
    "v_colors", "i_ski", "v_circus", "v_tempera", "v_london", "v_war", "i_parking", "v_bark", "v_charing",
    "i_indiana", "v_weapons", "v_wormhole", "v_maskedman", "v_dirtywall", "v_wall", "v_vitro", "i_nuts",
    "i_londonbridge", "i_pool", "i_pinard", "i_greentea", "v_calder", "i_lionday", "i_crownday", "i_kions",
    "v_posters", "i_dome", "v_machines", "v_laptop", "v_boat", "v_churchill", "i_pencils", "v_beyus", "v_sunseason",
    "v_samples", "v_cartooncity", "v_gardens", "v_bip", "v_home", "i_veggies", "i_nescafe", "v_wounded", "i_toy",
    "v_dogman", "i_duda", "i_contruction", "v_graffiti", "i_gonnenberg", "v_astronautis", "i_ktirio", "i_castle",
    "i_greenhouse", "i_fenis", "i_partyfood", "v_adam", "v_apprentices", "v_blueprint", "i_smurf", "i_objects",
    "v_bird", "i_melon", "v_grace", "i_miniature", "v_bricks", "i_chestnuts", "i_village", "i_steps", "i_dc"]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], Path]:
    """hpatches-release/<seq>/<image>.png with random (hence unique) patches; truth[seq] is (16, n, 65, 65)."""
    root = tmp_path_factory.mktemp("hp")
    rel = root / "hpatches-release"
    rng = np.random.default_rng(0)
    truth = {}
    for name, n in SEQS.items():
        (rel / name).mkdir(parents=True)
        truth[name] = rng.integers(0, 256, (len(IMAGE_NAMES), n, 65, 65), dtype=np.uint8)
        for i, img in enumerate(IMAGE_NAMES):
            Image.fromarray(truth[name][i].reshape(n * 65, 65), mode="L").save(rel / name / f"{img}.png")
    splits = root / "splits.json"
    splits.write_text(json.dumps(SPLITS))
    return root, truth, splits


def load(out: Path, split: str):
    blocks = [b for p in shard_paths(out, split) for b in read_blocks(p)]
    return blocks, tuple(np.concatenate([getattr(b, k) for b in blocks]) for k in ("pairs", "labels", "ids"))


def locate(truth: dict[str, np.ndarray]) -> dict[bytes, tuple[str, str, int]]:
    """patch bytes -> (sequence, image name, patch index)."""
    return {truth[s][i, k].tobytes(): (s, img, k) for s in truth for i, img in enumerate(IMAGE_NAMES)
            for k in range(truth[s].shape[1])}


def test_eval_pairs_pixels_ids_labels(release, tmp_path: Path) -> None:
    root, truth, splits = release
    m = hpatches_to_shards(root, tmp_path, split_name="s1", splits_json=splits, patch_size=65, eval_pairs=40,
                           train_pairs=30, pairs_per_block=4, blocks_per_shard=3, progress=False)
    verify_shards(tmp_path)
    assert m["generator"]["eval"]["sequences"] == ["i_beta", "v_delta"]
    assert m["generator"]["train"]["sequences"] == ["i_alpha", "v_gamma"]
    where = locate(truth)
    order = sorted(SEQS)
    _, (pairs, labels, ids) = load(tmp_path, "eval")
    assert pairs.shape == (40, 2, 65, 65) and labels.sum() == 20 == m["splits"]["eval"]["positives"]
    assert 0.2 < labels[:20].mean() < 0.8  # shuffled
    inter = 0
    for p, lab, (i0, i1) in zip(pairs, labels, ids):
        s0, img0, k0 = where[p[0].tobytes()]  # pixels are the written patches, untouched
        s1, img1, k1 = where[p[1].tobytes()]
        assert img0 == "ref" and img1 != "ref"
        assert {s0, s1} <= {"i_beta", "v_delta"}
        assert (i0, i1) == ((order.index(s0) << 32) + k0, (order.index(s1) << 32) + k1)
        assert lab == ((s0, k0) == (s1, k1))
        inter += s0 != s1
    assert 0 < inter < 20  # "mixed": both intra- and inter-sequence negatives


def test_train_pairs_distinct_images_same_point(release, tmp_path: Path) -> None:
    root, truth, splits = release
    m = hpatches_to_shards(root, tmp_path, split="train", split_name="s2", splits_json=splits, patch_size=65,
                           difficulties="e", pairs_per_block=4, blocks_per_shard=2, progress=False)
    assert list(m["splits"]) == ["train"]
    where = locate(truth)
    blocks, (pairs, labels, ids) = load(tmp_path, "train")
    assert len(labels) == SEQS["i_alpha"] and (labels == 1).all()  # default: one pair per point
    for block in blocks:
        assert len(np.unique(block.ids[:, 0])) == len(block)
    for p, (i0, i1) in zip(pairs, ids):
        s0, img0, k0 = where[p[0].tobytes()]
        s1, img1, k1 = where[p[1].tobytes()]
        assert (s0, k0) == (s1, k1) == ("i_alpha", i0 & 0xFFFFFFFF) and i0 == i1
        assert img0 != img1 and {img0[0], img1[0]} <= {"r", "e"}  # ref or e1..e5 only


def test_resize_65_to_32_and_pairs_function(release, tmp_path: Path) -> None:
    root, truth, splits = release
    kw = dict(split_name="s1", splits_json=splits, eval_pairs=24, seed=5)
    m = hpatches_to_shards(root, tmp_path, split="eval", pairs_per_block=8, progress=False, **kw)
    _, (pairs, labels, ids) = load(tmp_path, "eval")
    assert pairs.shape == (24, 2, 32, 32)
    p2, l2, i2 = hpatches_pairs(root, progress=False, **kw)
    np.testing.assert_array_equal(pairs, p2)
    np.testing.assert_array_equal(labels, l2)
    np.testing.assert_array_equal(ids, i2)
    order = sorted(SEQS)
    for p, i in zip(pairs[:, 0], ids[:, 0]):  # first patch = ref of that id, area-resized 65 -> 32
        src = truth[order[i >> 32]][0, i & 0xFFFFFFFF].astype(np.float64)
        # independent exact area resampling: every pixel -> 32x32 sub-pixels, then the mean of 65x65 blocks
        rows = src.repeat(32, 0).reshape(32, 65, 65).mean(1)
        area = rows.repeat(32, 1).reshape(32, 32, 65).mean(2)
        assert np.abs(p.astype(int) - np.floor(area + 0.5)).max() <= 1
        assert (p == np.floor(area + 0.5)).mean() > 0.99
    assert m["generator"]["resize"].startswith("area 65->32")


def test_split_names_select_sequences(tmp_path: Path) -> None:
    rel = tmp_path / "hpatches-release"
    for name in OFFICIAL_SEQUENCES:
        (rel / name).mkdir(parents=True)
        Image.new("L", (65, 65)).save(rel / name / "ref.png")
    (rel / "not_a_sequence").mkdir()
    assert list_sequences(tmp_path) == list(OFFICIAL_SEQUENCES) == list_sequences(rel)
    a = split_sequences(tmp_path, "a")
    assert a["test"] == sorted(OFFICIAL_SPLITS["a"]) and a["train"] == sorted(OFFICIAL_A_TRAIN)
    for name in ("a", "b", "c"):
        s = split_sequences(rel, name)
        assert len(s["test"]) == 40 and len(s["train"]) == 76 and not set(s["test"]) & set(s["train"])
        assert sum(n.startswith("i_") for n in s["test"]) == 20
    assert split_sequences(rel, "illum") == {"test": [n for n in OFFICIAL_SEQUENCES if n.startswith("i_")],
                                             "train": [n for n in OFFICIAL_SEQUENCES if n.startswith("v_")]}
    assert len(split_sequences(rel, "view")["test"]) == 59
    assert split_sequences(rel, "full") == {"test": list(OFFICIAL_SEQUENCES), "train": []}
    with pytest.raises(ValueError, match="unknown HPatches split 'd'"):
        split_sequences(rel, "d")
    import shutil

    shutil.rmtree(rel / "v_yard")  # in a's test set
    with pytest.raises(SourceError, match=r"v_yard: sequence of split 'a' not found"):
        split_sequences(rel, "a")


def test_bad_inputs_name_the_file(release, tmp_path: Path) -> None:
    root, truth, splits = release
    import shutil

    bad = tmp_path / "rel"
    shutil.copytree(root / "hpatches-release", bad)
    kw = dict(split="eval", split_name="s1", splits_json=splits, progress=False)
    with pytest.raises(SourceError, match="split 'full' has no train sequences"):
        hpatches_to_shards(bad, tmp_path / "o", split="train", split_name="full", progress=False)
    Image.new("L", (64, 65 * 4)).save(bad / "i_beta" / "h2.png")
    with pytest.raises(SourceError, match=r"i_beta/h2.png: 64x260 is not a vertical stack of 65x65"):
        hpatches_to_shards(bad, tmp_path / "o", **kw)
    Image.new("L", (65, 65 * 2)).save(bad / "i_beta" / "h2.png")
    with pytest.raises(SourceError, match=r"i_beta/h2.png: 2 patches, but ref.png has 4"):
        hpatches_to_shards(bad, tmp_path / "o", **kw)
    (bad / "i_beta" / "h2.png").unlink()
    with pytest.raises(SourceError, match=r"i_beta/h2.png: image not found"):
        hpatches_to_shards(bad, tmp_path / "o", **kw)
    hpatches_to_shards(bad, tmp_path / "o", difficulties="et", **kw)  # h images are not needed
    (tmp_path / "s.json").write_text(json.dumps({"s1": {"train": ["i_alpha"]}}))
    with pytest.raises(SourceError, match=r"s.json: split 's1' needs a 'test' list"):
        hpatches_to_shards(bad, tmp_path / "o", split_name="s1", splits_json=tmp_path / "s.json", progress=False)
    with pytest.raises(ValueError, match="difficulties"):
        hpatches_to_shards(bad, tmp_path / "o", difficulties="x", **{k: v for k, v in kw.items()})
