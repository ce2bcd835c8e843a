"""Bad data is survived where it can be (skipped, counted, warned once per shard) and refused
clearly where it cannot — never a hang, and nothing on disk is changed."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tarfile

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import Config
from pipeline.data.shards import (SCHEMA_VERSION, PairBlock, ShardError, read_blocks, shard_paths, write_manifest,
                                  write_split)
from pipeline.data.stream import StreamError, TrainStream, load_eval_pairs, load_eval_split, load_pairs
from pipeline.train import preflight


def _rewrite_manifest_sha(shard_dir, path):
    manifest_path = shard_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["name"] == path.name:
                shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def _corrupt_first_sample(path):
    """Replace the first sample's pairs.npy with bytes that are not a .npy file."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_key = members[0][0].name.split(".")[0]
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if info.name == f"{first_key}.pairs.npy":
                data = b"not a numpy file"
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def damaged(synthetic_shards, tmp_path):
    """A copy of the session shards with one truncated shard and one undecodable sample, the
    manifest updated so only the readers (not the checksums) see the damage."""
    shard_dir = tmp_path / "damaged"
    shutil.copytree(synthetic_shards, shard_dir)
    train = [shard_dir / p.split("/")[-1] for p in shard_paths(shard_dir, "train")]
    data = train[0].read_bytes()
    train[0].write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member
    _corrupt_first_sample(train[1])
    for p in train[:2]:
        _rewrite_manifest_sha(shard_dir, p)
    return shard_dir, train


def test_stream_skips_counts_and_warns_once_per_shard(damaged, caplog):
    shard_dir, train = damaged
    urls = [str(p) for p in train[:4]]  # 2 damaged + 2 good shards, one rank
    stream = TrainStream(urls, rank=0, world_size=1, epoch=0, batch_size=32, batches_per_epoch=80,
                         shuffle_buffer=64, seed=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        batches = list(stream)  # 80 batches = more than 2 passes over the 4 shards
    assert len(batches) == 80 and all(len(b["pairs"]) == 32 for b in batches)
    skipped = sum(b["skipped"] for b in batches)
    assert skipped >= 4  # each damaged shard at least once per pass, >= 2 passes
    warned = {r.getMessage().split()[5] for r in caplog.records if "skipping bad data" in r.getMessage()}
    assert warned == {str(train[0]), str(train[1])}  # once per shard, not once per event


def test_a_reader_with_only_bad_shards_raises_instead_of_hanging(tmp_path):
    bad = tmp_path / "train-000000.tar"
    bad.write_bytes(b"\0" * 1024 + b"garbage")
    stream = TrainStream([str(bad)], rank=0, world_size=1, epoch=0, batch_size=8, batches_per_epoch=1)
    with pytest.raises(StreamError, match="yielded no readable sample"):
        list(stream)


def _cfg(shard_dir, **data):
    return Config.model_validate({"data": {"shards": str(shard_dir), **data}, "scaling": {"num_workers": 2}})


def test_checksum_mismatch_is_refused_or_skipped_as_configured(synthetic_shards, tmp_path):
    shard_dir = tmp_path / "tampered"
    shutil.copytree(synthetic_shards, shard_dir)
    victim = shard_dir / "train-000003.tar"
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in shard_dir.iterdir()}
    with pytest.raises(ShardError, match=r"train-000003\.tar: sha256 [0-9a-f]{64} does not match the manifest's"):
        preflight(_cfg(shard_dir))
    urls = preflight(_cfg(shard_dir, on_bad_checksum="skip"))
    assert str(victim) not in urls["train"] and len(urls["train"]) == len(shard_paths(shard_dir, "train")) - 1
    assert {p.name: p.read_bytes() for p in shard_dir.iterdir()} == before  # nothing rewritten or deleted


def test_training_over_http_reports_skipped_samples(ray_cluster, damaged, tmp_path, tracking_uri):
    """The damaged shards served by a real HTTP server on 127.0.0.1 (as object storage serves them):
    preflight checks the manifest's checksums over HTTP, the Train worker streams the shards from
    their URLs, skips and counts the bad samples, and the count reaches MLflow. (One fit for both:
    the remote-shards training test lives here; each Ray Train fit costs ~28 CPU-s of start-ups.)"""
    from mlflow.tracking import MlflowClient

    from helpers import serve_folder, small_config
    from pipeline.evaluate import METRIC
    from pipeline.tracking import get_or_create_experiment
    from pipeline.train import build_trainer

    shard_dir, train = damaged
    with serve_folder(shard_dir) as url:
        cfg = small_config(url, tmp_path, tracking_uri, train={"epochs": 1, "batches_per_epoch": 30},
                           scaling={"num_workers": 1})
        client = MlflowClient(tracking_uri)
        run_id = client.create_run(get_or_create_experiment(client, "test")).info.run_id
        urls = preflight(cfg)
        assert urls["train"][:4] == [f"{url}/{p.name}" for p in train[:4]]
        urls["train"] = urls["train"][:4]  # a full pass over 2 damaged + 2 good shards
        result = build_trainer(cfg, name="skips", tracking_uri=tracking_uri, mlflow_run_id=run_id, shard_urls=urls).fit()
    assert result.metrics["data/skipped_samples"] >= 1 and 0 <= result.metrics[METRIC] <= 1
    history = client.get_metric_history(run_id, "data/skipped_samples")
    assert history and history[0].value == result.metrics["data/skipped_samples"]


# --- samples that differ from the manifest's schema (issue 15 #5) -------------------------------------

def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _craft_shard(path, blocks):
    """A shard written with tarfile + np.save (not the code under test): ``blocks`` are
    (pairs, labels, ids) arrays of any dtype/shape."""
    with tarfile.open(path, "w") as tar:
        for b, arrays in enumerate(blocks):
            for member, array in zip(("pairs.npy", "labels.npy", "ids.npy"), arrays):
                data = _npy(array)
                info = tarfile.TarInfo(f"{path.stem}-{b:05d}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _block(k, p, first_id, rng):
    labels = (np.arange(k) % 2).astype(np.uint8)
    a = np.arange(first_id, first_id + k, dtype=np.int64)
    return rng.integers(0, 256, (k, 2, p, p), dtype=np.uint8), labels, np.stack([a, np.where(labels == 1, a, a + 10_000)], 1)


@pytest.fixture
def off_schema(tmp_path):
    """4 train shards of 32x32 pairs (manifest patch_size 32), three replaced by shards whose
    samples break the schema in one way each, checksums updated so only the reader sees it."""
    rng = np.random.default_rng(0)
    blocks = [PairBlock(*_block(16, 32, 16 * i, rng)) for i in range(8)]
    manifest = {"schema_version": SCHEMA_VERSION, "source": "test", "patch_size": 32, "pairs_per_block": 16,
                "generator": {}, "splits": {"train": write_split(tmp_path, "train", blocks, 2, progress=False)}}
    write_manifest(tmp_path, manifest)
    paths = [tmp_path / f"train-{i:06d}.tar" for i in range(4)]
    big = [_block(16, 64, 1000 + 16 * b, rng) for b in range(2)]  # 64x64 among 32x32: was a broadcast error
    labels = [list(_block(16, 32, 2000 + 16 * b, rng)) for b in range(2)]
    for lab in labels:  # a label outside {0, 1} (ids kept equal iff the old label was 1)
        lab[1] = lab[1] * 2
    ids = [list(_block(16, 32, 3000 + 16 * b, rng)) for b in range(2)]
    for i in ids:
        i[2] = i[2].astype(np.int32)
    for path, crafted in zip(paths[1:], (big, labels, ids)):
        _craft_shard(path, crafted)
        _rewrite_manifest_sha(tmp_path, path)
    return tmp_path, paths


def test_samples_off_the_manifest_schema_are_skipped_counted_and_named(off_schema, caplog):
    shard_dir, paths = off_schema
    good_ids = {int(i) for b in read_blocks(paths[0]) for i in b.ids[:, 0]}
    stream = TrainStream([str(p) for p in paths], rank=0, world_size=1, epoch=0, batch_size=8,
                         batches_per_epoch=12, shuffle_buffer=0, seed=0)  # 96 pairs: 3 passes over the good shard
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        batches = list(stream)
    assert len(batches) == 12 and all(tuple(b["pairs"].shape) == (8, 2, 32, 32) for b in batches)
    assert {int(i) for b in batches for i in b["ids"][:, 0]} == good_ids  # nothing from the crafted shards
    assert sum(b["skipped"] for b in batches) >= 6  # each crafted sample, once per pass
    warnings = [r.getMessage() for r in caplog.records if "skipping bad data" in r.getMessage()]
    assert {w.split()[5] for w in warnings} == {str(p) for p in paths[1:]}  # once per shard, by name
    assert len(warnings) == 3
    why = " ".join(warnings)
    assert "pairs must be uint8 (K, 2, 32, 32), got uint8 (16, 2, 64, 64)" in why
    assert "labels must be 0 or 1, got max 2" in why and "ids must be int64 (16, 2), got int32" in why


def test_load_pairs_keeps_only_samples_that_fit_the_schema(off_schema):
    shard_dir, paths = off_schema
    pairs, labels, ids = load_pairs([str(p) for p in paths])
    expected = list(read_blocks(paths[0]))
    assert np.array_equal(pairs, np.concatenate([b.pairs for b in expected]))
    assert np.array_equal(ids, np.concatenate([b.ids for b in expected]))
    # without a manifest beside them the first readable sample sets the patch size: 64 here
    big = shard_dir / "alone" / "train-000000.tar"
    big.parent.mkdir()
    shutil.copy(paths[1], big)
    shutil.copy(paths[0], big.with_name("train-000001.tar"))
    assert load_pairs([str(big), str(big.with_name("train-000001.tar"))])[0].shape == (32, 2, 64, 64)
    assert load_pairs([str(p) for p in paths], patch_size=64)[0].shape == (32, 2, 64, 64)


# --- eval shards: verified wherever read; a short set is an error ----------------------------------------

@pytest.fixture
def eval_copy(synthetic_shards, tmp_path):
    shard_dir = tmp_path / "eval-copy"
    shutil.copytree(synthetic_shards, shard_dir)
    return shard_dir, [shard_dir / p.split("/")[-1] for p in shard_paths(shard_dir, "eval")]


def _flip_byte(path, at=5000):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_eval_shards_are_checksum_verified_where_they_are_read(eval_copy, capsys, caplog):
    shard_dir, evals = eval_copy
    clean = load_eval_pairs(shard_dir)
    assert len(clean[1]) == 1024
    _flip_byte(evals[3])
    per_shard = 256
    # only the shards the cap reaches are read (and hashed): the first three are intact
    assert np.array_equal(load_eval_pairs(shard_dir, 3 * per_shard)[0], clean[0][: 3 * per_shard])
    with pytest.raises(ShardError, match=r"eval-000003\.tar: sha256 [0-9a-f]{64} does not match the manifest's"):
        load_eval_pairs(shard_dir)
    cfg = _cfg(shard_dir, on_bad_checksum="skip")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shards"):
        pairs, labels, _ = load_eval_split(cfg.data)  # the call of training's rank 0, registration and sweep
    assert np.array_equal(pairs, clean[0][: 3 * per_shard]) and "eval-000003.tar" in caplog.text
    # `patchflow promote --shards DIR` reads the eval split before it asks MLflow anything
    assert main(["promote", "--model", "patchflow-hardnet", "--shards", str(shard_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("patchflow: error: ") and "eval-000003.tar: sha256" in err and len(err.splitlines()) == 1


def test_a_short_eval_set_is_an_error_naming_the_shard_unless_skipped(eval_copy, caplog):
    shard_dir, evals = eval_copy
    data = evals[1].read_bytes()
    evals[1].write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member ...
    _rewrite_manifest_sha(shard_dir, evals[1])  # ... and checksummed: only the reader can tell
    with pytest.raises(ShardError, match=r"short eval set: \S+/eval-000001\.tar gave \d+ of 256 pairs \(\d+ of 1024 pairs asked\)"):
        load_eval_pairs(shard_dir)
    with pytest.raises(ShardError, match=r"eval-000001\.tar gave \d+ of 256 pairs \(\d+ of 300 pairs asked\).*on_short_eval: skip"):
        load_eval_split(_cfg(shard_dir, eval_pairs=300).data)
    first = list(read_blocks(evals[0]))
    assert len(load_eval_pairs(shard_dir, 256)[1]) == 256  # the cap stops before the truncated shard
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        pairs, labels, ids = load_eval_split(_cfg(shard_dir, on_short_eval="skip").data)
    assert 3 * 256 <= len(labels) < 1024 and "short eval set" in caplog.text
    assert np.array_equal(ids[:256], np.concatenate([b.ids for b in first]))
