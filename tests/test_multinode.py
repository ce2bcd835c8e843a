"""Several Ray nodes on this machine (ray.cluster_utils.Cluster): DDP ranks on different nodes read
disjoint shards that together cover the epoch, with a shared storage_path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytestmark = pytest.mark.ray  # a 2-node Ray cluster of its own, in a subprocess

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from pipeline.config import Config
    from pipeline.hooks import RecordReads
    from pipeline.train import build_trainer, preflight

    shards, tmp = sys.argv[1], Path(sys.argv[2])
    from pipeline.cluster import LOCAL_CLUSTER_ENV
    os.environ.update(LOCAL_CLUSTER_ENV)  # the nodes inherit them (see start_local_ray) ...
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    for key in LOCAL_CLUSTER_ENV:  # ... and the driver does not forward them as a runtime_env
        del os.environ[key]
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    cfg = Config.model_validate({
        "data": {"shards": shards, "eval_pairs": 128, "shuffle_buffer": 0},
        "model": {"arch": "tfeat"},  # the smallest tower: this test is about which shards each rank reads
        "train": {"epochs": 1, "batch_size": 32, "batches_per_epoch": 64},
        "scaling": {"num_workers": 2},
        "run": {"storage_path": str(tmp / "shared-runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    })
    (tmp / "reads").mkdir()
    result = build_trainer(cfg, name="multinode", tracking_uri=cfg.mlflow.tracking_uri, mlflow_run_id=None,
                           shard_urls=preflight(cfg), hooks=RecordReads(str(tmp / "reads"))).fit()
    # a path that one node cannot see is refused before anything starts (the probe stands in for a
    # node whose filesystem lacks the mount: every node of this one-machine cluster shares /tmp)
    from pipeline.cluster import check_shared_storage
    from pipeline.config import ConfigError
    head = ray.get_runtime_context().get_node_id()
    def probe(path, head=head):
        import os, ray
        return os.path.exists(path) and ray.get_runtime_context().get_node_id() == head
    try:
        check_shared_storage(str(tmp / "node-local"), probe=probe)
        refused = ""
    except ConfigError as e:
        refused = str(e)
    print(json.dumps({"checkpoint": result.checkpoint.path, "refused": refused}))
    ray.shutdown()
    cluster.shutdown()
''')


def test_ranks_on_two_nodes_read_disjoint_shards_covering_the_epoch(synthetic_shards, tmp_path):
    # a temp dir of its own: Ray's record of "the current cluster" there is this cluster's, not the
    # session cluster's that this test process may also run (tests/conftest.py)
    ray_tmp = tempfile.mkdtemp(prefix="pf-ray-", dir="/tmp")
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(synthetic_shards), str(tmp_path)],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_TMPDIR": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    reads = [json.loads((tmp_path / "reads" / f"rank{r}-epoch0.json").read_text()) for r in (0, 1)]
    assert reads[0]["node"] != reads[1]["node"]  # one rank per node
    ids0, ids1 = set(reads[0]["ids"]), set(reads[1]["ids"])
    assert len(reads[0]["ids"]) == len(ids0) == 2048 and len(ids1) == 2048  # a full pass each, no repeats
    assert not ids0 & ids1  # disjoint shards
    from pipeline.data.shards import load_manifest

    assert len(ids0 | ids1) == load_manifest(synthetic_shards)["splits"]["train"]["pairs"]  # together: the epoch
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["checkpoint"].startswith(str(tmp_path / "shared-runs"))  # the shared path passed the check
    assert "run.storage_path: " in out["refused"] and "is a node-local path on a 2-node cluster" in out["refused"]
