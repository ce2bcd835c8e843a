"""The local Ray cluster patchflow starts: its settings, its own current-cluster record. (Two DDP ranks
in sync and an epoch not logged twice: tests/test_fault_tolerance.py.)"""

from __future__ import annotations

import os

import pytest


def test_session_cluster_polls_fast_and_the_driver_forwards_nothing(ray_cluster):
    """start_local_ray: the cluster's processes poll Train workers every HEALTH_CHECK_INTERVAL_S and
    start no preemption watcher, while the driver's environment lacks the variables, so Ray Train
    sends no runtime_env (which would start every Train actor in a fresh process)."""
    import os

    from pipeline.cluster import LOCAL_CLUSTER_ENV

    @ray_cluster.remote(num_cpus=0)
    def cluster_settings():
        return {key: os.environ.get(key) for key in LOCAL_CLUSTER_ENV}

    assert ray_cluster.get(cluster_settings.remote()) == LOCAL_CLUSTER_ENV
    assert not set(LOCAL_CLUSTER_ENV) & set(os.environ)


def test_the_cluster_finds_itself_when_another_ray_took_the_machine_wide_record(ray_cluster):
    """Inside the cluster, Ray's address auto-detection (what Train's PlacementGroupCleaner uses to
    ask whether the controller lives) answers this cluster, even after another Ray on the machine
    overwrote the machine-wide record. Before start_local_ray gave its cluster a record of its own,
    the cleaner asked the other cluster, heard "no such actor" and killed a zoo run mid-epoch."""
    from ray._private.utils import get_ray_address_file, read_ray_address, write_ray_address

    @ray_cluster.remote(num_cpus=0)
    def detected_address():
        from ray._private.services import get_ray_address_from_environment

        return get_ray_address_from_environment(None, None)

    ours = ray_cluster.get_runtime_context().gcs_address
    previous = read_ray_address()
    write_ray_address("127.0.0.1:1")  # what another Ray started later would leave there
    try:
        assert ray_cluster.get(detected_address.remote()) == ours
    finally:
        if previous:
            write_ray_address(previous)
        else:
            os.remove(get_ray_address_file(None))


@pytest.mark.ray
@pytest.mark.parametrize("previous", ["127.0.0.1:1", None], ids=["record-present", "fresh-machine"])
def test_a_local_cluster_puts_the_machine_wide_record_back_quietly_at_exit(previous):
    """``start_local_ray`` records its cluster as the machine's current one and puts the previous
    record back at exit without Ray's "Overwriting previous Ray address" log line, which at
    interpreter exit could meet a closed stream (a "Logging error" traceback after test runs). On a
    fresh machine (no Ray folder yet, so no record) it creates the folder and removes its record at
    exit. A Ray of its own, in a process of its own, under its own temp dir: no other cluster's
    record is touched."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    short = Path(tempfile.mkdtemp(prefix="pf-t-", dir="/tmp"))  # Ray's socket paths under it have a length limit
    record = short / "ray" / "ray_current_cluster"
    if previous:
        record.parent.mkdir()
        record.write_text(previous)
    code = ("import ray; from pipeline.cluster import start_local_ray; start_local_ray(1, include_dashboard=False); "
            f"assert open({str(record)!r}).read() == ray.get_runtime_context().gcs_address")
    try:
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RAY_TMPDIR": str(short)},
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        if previous:
            assert record.read_text() == previous
            # one "Overwriting previous Ray address" line, Ray's at start; none from the restore at exit
            assert done.stderr.count("Overwriting previous Ray address") == 1, done.stderr[-2000:]
        else:
            assert not record.exists()
            assert "Overwriting previous Ray address" not in done.stderr
    finally:
        shutil.rmtree(short, ignore_errors=True)
