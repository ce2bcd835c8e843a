"""Shards served over HTTP by a real server on 127.0.0.1: manifest, checksums, streaming, training."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest

from helpers import small_config
from pipeline.data.shards import ShardError, load_manifest, shard_paths
from pipeline.data.stream import TrainStream, load_pairs, reader_url
from pipeline.train import METRIC, build_trainer, preflight


@pytest.fixture(scope="module")
def http_shards(synthetic_shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(synthetic_shards))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_manifest_paths_and_checksums_over_http(http_shards, synthetic_shards, tmp_path):
    assert load_manifest(http_shards) == load_manifest(synthetic_shards)
    urls = shard_paths(http_shards, "eval")
    assert urls[0] == f"{http_shards}/eval-000000.tar"
    cfg = small_config(http_shards, tmp_path, "sqlite:///unused.db")
    assert preflight(cfg)["train"] == shard_paths(http_shards, "train")  # sha256 streamed and matched
    with pytest.raises(ShardError, match=r"http://127\.0\.0\.1:\d+/nowhere/manifest.json: manifest could not be fetched"):
        load_manifest(f"{http_shards}/nowhere")


def test_stream_over_http_equals_local(http_shards, synthetic_shards):
    remote = load_pairs(shard_paths(http_shards, "eval"))
    local = load_pairs(shard_paths(synthetic_shards, "eval"))
    assert all(np.array_equal(a, b) for a, b in zip(remote, local))
    kw = dict(rank=1, world_size=2, epoch=0, batch_size=32, batches_per_epoch=5, shuffle_buffer=64, seed=0)
    remote_ids = [b["ids"] for b in TrainStream(shard_paths(http_shards, "train"), **kw)]
    local_ids = [b["ids"] for b in TrainStream(shard_paths(synthetic_shards, "train"), **kw)]
    assert all(np.array_equal(a, b) for a, b in zip(remote_ids, local_ids))


def test_object_store_urls_stream_through_their_clis():
    assert reader_url("s3://bucket/x/train-000000.tar") == "pipe:aws s3 cp --quiet s3://bucket/x/train-000000.tar -"
    assert reader_url("gs://bucket/x/train-000000.tar") == "pipe:gcloud storage cat gs://bucket/x/train-000000.tar"
    assert reader_url("http://h/x.tar") == "http://h/x.tar"


def test_training_reads_shards_over_http(ray_cluster, http_shards, tmp_path, tracking_uri):
    cfg = small_config(http_shards, tmp_path, tracking_uri, train={"epochs": 1, "batches_per_epoch": 3},
                       scaling={"num_workers": 1})
    result = build_trainer(cfg, name="over-http", tracking_uri=tracking_uri, mlflow_run_id=None,
                           shard_urls=preflight(cfg)).fit()
    assert result.metrics["data/skipped_samples"] == 0 and 0 <= result.metrics[METRIC] <= 1
