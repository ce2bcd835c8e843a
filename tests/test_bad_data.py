"""Bad data is survived where it can be (skipped, counted, warned once per shard) and refused
clearly where it cannot — never a hang, and nothing on disk is changed."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tarfile

import pytest

from pipeline.config import Config
from pipeline.data.shards import ShardError, shard_paths
from pipeline.data.stream import StreamError, TrainStream
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


def test_training_reports_skipped_samples(ray_cluster, damaged, tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    from helpers import small_config
    from pipeline.tracking import get_or_create_experiment
    from pipeline.train import build_trainer

    shard_dir, train = damaged
    cfg = small_config(shard_dir, tmp_path, tracking_uri, train={"epochs": 1, "batches_per_epoch": 30},
                       scaling={"num_workers": 1})
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(get_or_create_experiment(client, "test")).info.run_id
    urls = preflight(cfg)
    urls["train"] = [str(p) for p in train[:4]]  # a full pass over 2 damaged + 2 good shards
    result = build_trainer(cfg, name="skips", tracking_uri=tracking_uri, mlflow_run_id=run_id, shard_urls=urls).fit()
    assert result.metrics["data/skipped_samples"] >= 1
    history = client.get_metric_history(run_id, "data/skipped_samples")
    assert history and history[0].value == result.metrics["data/skipped_samples"]
