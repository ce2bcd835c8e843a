"""Session-wide real parts: one local Ray cluster and one set of synthetic shards for the run."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Every test that uses the session cluster (directly or through another fixture) carries the
    ``ray`` marker, so ``pytest -m "not ray"`` is the fast inner loop. Tests that start a Ray of their
    own (tests/test_multinode.py, tests/test_jobs.py) are marked in their files.

    Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) the session-cluster tests form one
    group, so one worker runs them all on one cluster while the other runs everything else: the Ray
    tests alone keep the 2 cores 73 % busy (process start-ups; polls, servers restarting), and the
    CPU-bound tests fill the rest. A grouping that did not take would start a second session cluster, a layout that was
    no faster (benchmarks/README, "The suite") and that hung a sweep before start_local_ray gave each
    cluster its own current-cluster record; so it is an error. Retried with that fixed (a cluster per
    process, ``--dist loadfile``): the machine was 98 % busy instead of 85 %, yet the suite took as
    long, and the sweep-resume test, beside another process's fits, came within 20 s of its deadline."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.xdist_group("session-cluster"))
    result = yield  # xdist's own hook (in each worker) turns the group into the node id suffix its scheduler reads
    if getattr(config.option, "loadgroup", False):
        lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if lost:
            raise pytest.UsageError(f"pytest-xdist did not group {len(lost)} session-cluster tests (e.g. {lost[0]}): "
                                    "pytest >= 9.2 breaks --dist loadgroup (pytest-xdist#1386); install pytest<9.2")
    return result


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster, started once: 2 CPUs (the CI machine's size) and 2 trial slots
    (see pipeline.tune for why Tune trial drivers hold a slot instead of a CPU)."""
    import ray

    from pipeline.cluster import start_local_ray

    # its processes find it by a record of their own: other Ray instances (tests/test_jobs.py's head) cannot confuse them
    # MLflow retries a refused connection several times, with growing waits, in the Train workers, which
    # read their environment from the cluster; tests that stop or omit the tracking server want the
    # failure at once (what survives an outage is patchflow's backlog and pending files, not MLflow's retries)
    # (the tests' own MLflow clients keep MLflow's default)
    start_local_ray(2, cluster_env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Real tar shards from the real generator, small: 16 train shards of 256 pairs, 4 eval shards."""
    from helpers import FEW_IMAGES
    from pipeline.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("shards")
    generate_synthetic(out, train_pairs=4096, eval_pairs=1024, pairs_per_block=128, blocks_per_shard=2, seed=0,
                       images=FEW_IMAGES, progress=False)
    return out


# Tracking that fails never fails training: the shared fits log to a port where nothing listens (the
# discard port; the workers fail at once, see ray_cluster's MLFLOW_HTTP_REQUEST_MAX_RETRIES).
DEAD_TRACKING_URI = "http://127.0.0.1:9"


@pytest.fixture(scope="session")
def ddp_fit(ray_cluster, synthetic_shards, tmp_path_factory):
    """``ddp_fit(arch)``: one 2-worker Ray Train fit of ``arch`` on the session shards, made on first use
    and shared (each fit costs ~28 CPU-s of process start-ups). tests/test_architectures_ray.py checks
    every pipeline path on it; hardnet's is also tests/test_fault_tolerance.py's uninterrupted reference,
    so the config is that test's too (2 epochs of 3 steps, one restart allowed, MC-Loss on; the
    other architectures train 1 epoch). Returns
    (config, result, folder of DumpParams' per-rank weights)."""
    from types import SimpleNamespace

    from helpers import small_config
    from pipeline.hooks import DumpParams
    from pipeline.models import model_info
    from pipeline.train import build_trainer

    fits = {}

    def fit(arch: str) -> SimpleNamespace:
        if arch not in fits:
            tmp = tmp_path_factory.mktemp(f"ddp-{arch}")
            cfg = small_config(
                synthetic_shards, tmp, DEAD_TRACKING_URI,
                # the attached head by learned whitening (the demo's HardNet), the plain PCA fit by the sweep's curve
                model={"arch": arch, **({"pca_dim": 32} if model_info(arch).pca != "none" else {}),
                       **({"pca_fit": "learned_whitening"} if model_info(arch).pca == "attach" else {})},
                loss={"mc_mu": 0.1 if arch == "hardnet" else 0.0, "mc_xi": 4},  # one run covers the MC-Loss term
                data={"eval_pairs": 256},
                # two epochs only where the fault-tolerance test needs them (a failure in the second)
                train={"epochs": 2 if arch == "hardnet" else 1, "batches_per_epoch": 3, "batch_size": 16, "lr": 0.01},
                run={"max_failures": 1},
            )
            dump = tmp / "params"
            dump.mkdir()
            result = build_trainer(cfg, name=f"ddp-{arch}", tracking_uri=DEAD_TRACKING_URI, mlflow_run_id="0" * 32,
                                   hooks=DumpParams(str(dump))).fit()
            fits[arch] = SimpleNamespace(cfg=cfg, result=result, dump=dump)
        return fits[arch]

    return fit


@pytest.fixture(scope="session")
def _empty_tracking_db(tmp_path_factory):
    """An MLflow SQLite store with its tables made once: creating them runs MLflow's ~50 schema
    migrations, ~1.3 CPU-s per fresh file."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, _empty_tracking_db):
    """A SQLite tracking store of the test's own (a copy of the empty, migrated one)."""
    import shutil

    shutil.copyfile(_empty_tracking_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` process for the whole run; yields its http:// tracking URI."""
    from helpers import free_port, start_mlflow_server

    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)
