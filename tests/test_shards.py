"""Shard writing/reading on real files: round trip (own reader and webdataset), checksums, errors."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline.data.shards import (SCHEMA_VERSION, PairBlock, ShardError, load_manifest, read_blocks, shard_paths,
                                  verify_shards, write_manifest, write_split)

P = 16


def make_blocks(sizes: list[int], seed: int = 0) -> list[PairBlock]:
    rng = np.random.default_rng(seed)
    out, next_id = [], 0
    for k in sizes:
        labels = (rng.random(k) < 0.5).astype(np.uint8)
        a = np.arange(next_id, next_id + k, dtype=np.int64)
        next_id += k
        b = np.where(labels == 1, a, a + 10_000)
        out.append(PairBlock(rng.integers(0, 256, (k, 2, P, P), dtype=np.uint8), labels, np.stack([a, b], 1)))
    return out


def write(tmp_path: Path, sizes=(8, 8, 8, 8, 3), per_shard=2, split="train") -> tuple[list[PairBlock], dict]:
    blocks = make_blocks(list(sizes))
    entry = write_split(tmp_path, split, blocks, per_shard, progress=False)
    manifest = {"schema_version": SCHEMA_VERSION, "source": "test", "patch_size": P, "pairs_per_block": 8,
                "generator": {}, "splits": {split: entry}}
    write_manifest(tmp_path, manifest)
    return blocks, entry


def concat(blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.concatenate([b.pairs for b in blocks]), np.concatenate([b.labels for b in blocks]),
            np.concatenate([b.ids for b in blocks]))


def test_round_trip_reader_webdataset_and_manifest(tmp_path: Path) -> None:
    blocks, entry = write(tmp_path)
    paths = shard_paths(tmp_path, "train")
    assert [Path(p).name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert all(Path(p).is_absolute() for p in paths)
    assert not list(tmp_path.glob("*.tmp"))

    # own reader
    read = [b for p in paths for b in read_blocks(p)]
    assert len(read) == len(blocks)
    for w, r in zip(blocks, read):
        for name in ("pairs", "labels", "ids"):
            np.testing.assert_array_equal(getattr(w, name), getattr(r, name))
            assert getattr(w, name).dtype == getattr(r, name).dtype

    # a plain webdataset pipeline decodes the same arrays, in order, with the documented keys
    ds = wds.WebDataset(paths, shardshuffle=False, nodesplitter=lambda urls: urls).decode()
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [
        "train-000000-00000", "train-000000-00001", "train-000001-00000", "train-000001-00001", "train-000002-00000"]
    for w, s in zip(blocks, samples):
        np.testing.assert_array_equal(s["pairs.npy"], w.pairs)
        np.testing.assert_array_equal(s["labels.npy"], w.labels)
        np.testing.assert_array_equal(s["ids.npy"], w.ids)
        assert s["pairs.npy"].dtype == np.uint8 and s["ids.npy"].dtype == np.int64

    # manifest counts and independently recomputed checksums
    m = load_manifest(tmp_path)
    assert m["splits"]["train"] == entry
    _, labels, _ = concat(blocks)
    assert entry["pairs"] == len(labels) == 35 and entry["positives"] == int(labels.sum())
    assert [(s["pairs"], s["blocks"]) for s in entry["shards"]] == [(16, 2), (16, 2), (3, 1)]
    for s, p in zip(entry["shards"], paths):
        assert s["sha256"] == hashlib.sha256(Path(p).read_bytes()).hexdigest()
    verify_shards(tmp_path)
    verify_shards(tmp_path, "train")


def test_tar_members_have_no_pax_headers_and_are_reproducible(tmp_path: Path) -> None:
    _, e1 = write(tmp_path / "a")
    _, e2 = write(tmp_path / "b")
    assert [s["sha256"] for s in e1["shards"]] == [s["sha256"] for s in e2["shards"]]
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == [
        "train-000000-00000.ids.npy", "train-000000-00000.labels.npy", "train-000000-00000.pairs.npy"]
    assert all(m.pax_headers == {} and m.mtime == 0 for m in members)


def test_corrupted_byte_is_detected(tmp_path: Path) -> None:
    write(tmp_path)
    victim = tmp_path / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-000001.tar") as exc:
        verify_shards(tmp_path)
    assert hashlib.sha256(bytes(data)).hexdigest() in str(exc.value)


def test_missing_shard_and_split(tmp_path: Path) -> None:
    write(tmp_path)
    with pytest.raises(ShardError, match="'eval'"):
        shard_paths(tmp_path, "eval")
    (tmp_path / "train-000002.tar").unlink()
    with pytest.raises(ShardError, match="train-000002.tar"):
        shard_paths(tmp_path, "train")


def test_failed_write_leaves_no_tmp_and_no_partial_shard(tmp_path: Path) -> None:
    def blocks():
        yield from make_blocks([4, 4, 4])
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_split(tmp_path, "train", blocks(), 2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]  # only the completed shard


def test_rewrite_removes_stale_shards(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / "train-000005.tar.tmp").write_bytes(b"left by a crash")
    _, entry = write(tmp_path, sizes=(8,))
    assert sorted(p.name for p in tmp_path.glob("train-*")) == ["train-000000.tar"]
    assert entry["pairs"] == 8


def test_validate_rejects_bad_blocks(tmp_path: Path) -> None:
    good = make_blocks([4])[0]
    good.validate(P)
    with pytest.raises(ShardError, match="pairs must be uint8"):
        PairBlock(good.pairs.astype(np.int16), good.labels, good.ids).validate(P)
    with pytest.raises(ShardError, match="pairs must be uint8"):
        good.validate(32)
    with pytest.raises(ShardError, match="ids must be int64"):
        PairBlock(good.pairs, good.labels, good.ids.astype(np.int32)).validate(P)
    with pytest.raises(ShardError, match="labels must be uint8"):
        PairBlock(good.pairs, good.labels[:2], good.ids).validate(P)
    flipped = PairBlock(good.pairs, 1 - good.labels, good.ids)
    with pytest.raises(ShardError, match="equal iff label 1"):
        flipped.validate(P)
    with pytest.raises(ShardError, match="train-000000.tar"):  # the writer names the shard
        write_split(tmp_path, "train", [good, flipped], 4, progress=False)
    with pytest.raises(ShardError, match="unknown split"):
        write_split(tmp_path, "test", [good], 4, progress=False)


def test_load_manifest_errors_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    with pytest.raises(ShardError, match="not found") as exc:
        load_manifest(tmp_path)
    assert str(path) in str(exc.value)

    path.write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON") as exc:
        load_manifest(tmp_path)
    assert str(path) in str(exc.value)

    path.write_text(json.dumps({"schema_version": 2, "source": "x", "patch_size": 32, "pairs_per_block": 1,
                                "splits": {}}))
    with pytest.raises(ShardError, match="schema_version 2, expected 1") as exc:
        load_manifest(tmp_path)
    assert str(path) in str(exc.value)

    path.write_text(json.dumps({"schema_version": 1, "source": "x", "splits": {}}))
    with pytest.raises(ShardError, match="patch_size") as exc:
        load_manifest(path)  # the manifest file itself is accepted too
    assert str(path) in str(exc.value)

    path.write_text(json.dumps({"schema_version": 1, "source": "x", "patch_size": 32, "pairs_per_block": 1,
                                "splits": {"train": {"pairs": 1, "positives": 1, "shards": [{"name": "a.tar"}]}}}))
    with pytest.raises(ShardError, match="sha256"):
        load_manifest(tmp_path)


# --- resumable conversions -------------------------------------------------------------------------

PARAMS = {"source": "test", "seed": 0, "sizes": [8, 8, 8, 8, 8, 8, 3]}


def _convert(out: Path, blocks, report: dict | None = None, params: dict = PARAMS) -> dict:
    entry = write_split(out, "train", blocks, 2, progress=False, params=params, report=report)
    manifest = {"schema_version": SCHEMA_VERSION, "source": "test", "patch_size": P, "pairs_per_block": 8,
                "created": "fixed", "generator": params, "splits": {"train": entry}}
    write_manifest(out, manifest)
    return manifest


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_interrupted_conversion_resumes_writing_only_missing_shards(tmp_path: Path, caplog) -> None:
    sizes = PARAMS["sizes"]  # 7 blocks, 2 per shard -> 4 shards
    reference = _convert(tmp_path / "ref", make_blocks(sizes))

    def dies_after(n_blocks: int):
        yield from make_blocks(sizes)[:n_blocks]
        raise RuntimeError("killed")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        _convert(out, dies_after(5))  # shards 0 and 1 complete, shard 2 half-way
    assert sorted(p.name for p in out.iterdir()) == ["manifest.partial.json", "train-000000.tar", "train-000001.tar"]
    partial = json.loads((out / "manifest.partial.json").read_text())
    entry = partial["splits"]["train"]
    assert entry["params"] == PARAMS and entry["complete"] is False and entry["blocks_per_shard"] == 2
    assert [s["name"] for s in entry["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert [s["sha256"] for s in entry["shards"]] == [s["sha256"] for s in reference["splits"]["train"]["shards"][:2]]
    assert [s["positives"] for s in entry["shards"]] == [int(sum(b.labels.sum() for b in make_blocks(sizes)[i:i + 2]))
                                                         for i in (0, 2)]
    before = {n: (out / n).stat() for n in ("train-000000.tar", "train-000001.tar")}

    report: dict = {}
    with caplog.at_level("INFO", logger="pipeline.data.shards"):
        _convert(out, make_blocks(sizes), report)
    assert report == {"written": ["train-000002.tar", "train-000003.tar"],
                      "skipped": ["train-000000.tar", "train-000001.tar"]}
    assert "2 of 4 shard(s) already complete" in caplog.text
    for name, st in before.items():  # not rewritten: same inode, same mtime
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert _files(out) == _files(tmp_path / "ref")  # byte-identical, partial manifest gone
    verify_shards(out)


def test_resume_rewrites_damaged_or_changed_shards(tmp_path: Path) -> None:
    sizes = PARAMS["sizes"]
    _convert(tmp_path, make_blocks(sizes))
    victim = tmp_path / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    (tmp_path / "train-000003.tar").unlink()
    report: dict = {}
    _convert(tmp_path, make_blocks(sizes), report)
    assert report == {"written": ["train-000001.tar", "train-000003.tar"],
                      "skipped": ["train-000000.tar", "train-000002.tar"]}
    verify_shards(tmp_path)

    # Different data (another seed) under the same names: everything is rewritten.
    report = {}
    _convert(tmp_path, make_blocks(sizes[:3], seed=1), report, params={**PARAMS, "seed": 1})
    assert report == {"written": ["train-000000.tar", "train-000001.tar"], "skipped": []}
    assert sorted(p.name for p in tmp_path.glob("train-*")) == ["train-000000.tar", "train-000001.tar"]
    verify_shards(tmp_path)


def test_partial_manifest_with_other_params_is_reset(tmp_path: Path) -> None:
    def dies_after(n_blocks: int, seed: int):
        yield from make_blocks(PARAMS["sizes"], seed=seed)[:n_blocks]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_split(tmp_path, "train", dies_after(3, 0), 2, progress=False, params=PARAMS)
    with pytest.raises(RuntimeError):
        write_split(tmp_path, "train", dies_after(5, 1), 2, progress=False, params={**PARAMS, "seed": 1})
    entry = json.loads((tmp_path / "manifest.partial.json").read_text())["splits"]["train"]
    assert entry["params"]["seed"] == 1 and len(entry["shards"]) == 2
    (tmp_path / "manifest.partial.json").write_text("{broken")  # unreadable: ignored, then replaced
    write_split(tmp_path, "train", make_blocks([8]), 2, progress=False, params=PARAMS)
    assert json.loads((tmp_path / "manifest.partial.json").read_text())["splits"]["train"]["complete"] is True


def test_array_memory_layout_does_not_change_shard_bytes(tmp_path: Path) -> None:
    block = make_blocks([8])[0]
    fortran = PairBlock(np.asfortranarray(block.pairs), block.labels, np.asfortranarray(block.ids))
    assert not fortran.ids.flags["C_CONTIGUOUS"]
    a = write_split(tmp_path / "c", "eval", [block], 1, progress=False)
    b = write_split(tmp_path / "f", "eval", [fortran], 1, progress=False)
    assert a == b
    np.testing.assert_array_equal(next(read_blocks(tmp_path / "f" / "eval-000000.tar")).ids, block.ids)
