"""Shards served over HTTP by a real server on 127.0.0.1: manifest, checksums, streaming. (Training from
shard URLs: tests/test_bad_data.py, on damaged shards served the same way.)"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import serve_folder, small_config
from pipeline.data.shards import ShardError, load_manifest, open_shard, shard_paths
from pipeline.data.stream import StreamError, TrainStream, load_pairs
from pipeline.train import preflight


@pytest.fixture(scope="module")
def http_shards(synthetic_shards):
    with serve_folder(synthetic_shards) as url:
        yield url


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


def test_registered_manifest_digest_over_http(http_shards, synthetic_shards):
    from pipeline.registry import manifest_sha256

    assert manifest_sha256(http_shards) == hashlib.sha256((synthetic_shards / "manifest.json").read_bytes()).hexdigest()
    assert manifest_sha256(f"{http_shards}/manifest.json") == manifest_sha256(synthetic_shards)


# --- no shell from data (issue 15 #3): webdataset's `pipe:` convention ran these through `sh -c` ---

CRAFTED = "s3://bucket/x;touch {marker};#.tar"


def test_crafted_shard_url_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "FILE"
    url = CRAFTED.format(marker=marker)
    with pytest.raises(ShardError, match=r"shard file name 'FILE;#\.tar' does not match"):
        load_pairs([url])
    with pytest.raises(ShardError, match="does not match"):
        TrainStream([url], rank=0, world_size=1, epoch=0, batch_size=8, batches_per_epoch=1)
    # a valid name behind a `pipe:` prefix is only an odd local path: nothing is executed
    with pytest.raises(StreamError, match="no pairs could be read"):
        load_pairs([f"pipe:touch {marker}; cat /dev/null #/train-000000.tar"])
    assert not marker.exists()


@pytest.mark.parametrize("scheme, package, extra", [("s3", "s3fs", "s3"), ("gs", "gcsfs", "gcs")])
def test_object_stores_are_read_through_fsspec_not_a_shell(tmp_path, scheme, package, extra):
    """The old reader ran `aws s3 cp --quiet {url} -` / `gcloud storage cat {url}` in a shell, so
    `$(...)` in a shard's path ran. Now the URL goes to fsspec, which needs the optional package."""
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed: the URL would be fetched from the real {scheme}:// service")
    marker = tmp_path / "FILE"
    url = f"{scheme}://bucket/$(touch {marker})/train-000000.tar"
    with pytest.raises(ShardError, match=rf"needs the optional package {package}: pip install 'patchflow\[{extra}\]'"):
        open_shard(url)
    for call in (lambda: TrainStream([url], rank=0, world_size=1, epoch=0, batch_size=8, batches_per_epoch=1),
                 lambda: load_pairs([url]), lambda: load_manifest(f"{scheme}://bucket/shards")):
        with pytest.raises(ShardError, match=f"needs the optional package {package}"):
            call()
    assert not marker.exists()


def _served_copy(src, dst, rename):
    """A copy of the shard folder whose manifest lists one eval shard under a crafted name."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["splits"]["eval"]["shards"][1]["name"] = rename
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("name", ["x;touch FILE;#.tar", "../train-000000.tar", "eval-1.tar", "train-000001.tar"])
def test_manifest_with_a_crafted_shard_name_is_refused(synthetic_shards, tmp_path, name):
    shard_dir = _served_copy(synthetic_shards, tmp_path / "crafted", name)
    expected = rf"{shard_dir / 'manifest.json'}: split 'eval' shard 1 has name {re.escape(repr(name))}, expected 'eval-NNNNNN\.tar'"
    for call in (load_manifest, lambda d: shard_paths(d, "train"), lambda d: preflight(small_config(d, tmp_path, "sqlite:///x.db"))):
        with pytest.raises(ShardError, match=expected):
            call(shard_dir)
    with serve_folder(shard_dir) as url:
        with pytest.raises(ShardError, match=rf"{url}/manifest.json: split 'eval' shard 1 has name"):
            load_manifest(url)
    assert not (tmp_path / "FILE").exists() and not Path("FILE").exists()
