"""Connecting to (or starting) Ray, in one place."""

from __future__ import annotations

import atexit
import os

TRIAL_SLOT = "trial_slot"  # custom resource that Tune trial drivers hold instead of a CPU


def pin_cluster_address() -> None:
    """Make this process's local cluster the one Ray's internal clients auto-detect.

    Train V2's PlacementGroupCleaner (and other State API users inside the cluster) look the
    cluster up by address=None: with a second Ray instance on the machine (a `ray start` head,
    another user's job) that lookup fails ("Found multiple active Ray instances"), the cleaner
    dies, finished trials leak their placement groups and the next wave of trials waits forever.
    Auto-detection reads the "current cluster" file first, so point it at ours, and put the
    previous content back at exit.
    """
    import ray
    from ray._private.utils import get_ray_address_file, read_ray_address, write_ray_address

    previous = read_ray_address()
    write_ray_address(ray.get_runtime_context().gcs_address)

    def restore() -> None:
        if previous:
            write_ray_address(previous)
        else:
            try:
                os.remove(get_ray_address_file(None))
            except OSError:
                pass

    atexit.register(restore)


def _running_cluster() -> str | None:
    """The cluster a plain ``ray.init()`` would join: one started with ``ray start`` and recorded
    in Ray's current-cluster file, if its GCS is still running (a stale file is removed)."""
    from ray._private.services import find_gcs_addresses
    from ray._private.utils import get_ray_address_file, read_ray_address

    recorded = read_ray_address()
    if recorded and recorded in find_gcs_addresses():
        return recorded
    if recorded:
        os.remove(get_ray_address_file(None))  # left by a Ray that died without cleaning up
    return None


def init_ray(address: str | None = None) -> None:
    """Join ``address`` / $RAY_ADDRESS / a running ``ray start`` cluster; otherwise start a local
    Ray with this machine's CPUs and one trial slot per CPU (see ``pipeline.tune`` for why)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or _running_cluster()
    if address:
        ray.init(address=address)
        return
    cpus = os.cpu_count() or 1
    # Ray Train's controller polls its workers every 2 s, so each run sat up to ~3 s idle after
    # its last report before fit() returned: per trial, a sweep paid it again. The local cluster's
    # processes inherit this environment; a cluster joined above keeps its own setting.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(address="local", num_cpus=cpus, resources={TRIAL_SLOT: cpus}, include_dashboard=True, log_to_driver=True)
    pin_cluster_address()


def _marker_visible(path: str) -> bool:
    return os.path.exists(path)


def check_shared_storage(storage_path: str, probe=_marker_visible) -> None:
    """Refuse a local ``run.storage_path`` that some node of a multi-node cluster cannot see:
    checkpoints written there by one node would be missing on another at restore time.

    A marker file is written by the driver and looked for by a task pinned to every alive node
    (``probe`` runs there). URIs (s3://, gs://, ...) and single-node clusters pass as they are.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.config import ConfigError

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if "://" in storage_path or len(nodes) < 2:
        return
    os.makedirs(storage_path, exist_ok=True)
    marker = os.path.join(storage_path, f".patchflow-shared-{uuid.uuid4().hex}")
    open(marker, "w").close()
    try:
        remote_probe = ray.remote(num_cpus=0)(probe)
        seen = ray.get([
            remote_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
            for n in nodes
        ])
    finally:
        os.remove(marker)
    blind = [n["NodeManagerAddress"] + " " + n["NodeID"][:8] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ConfigError(
            f"run.storage_path: {storage_path} is a node-local path on a {len(nodes)}-node cluster: "
            f"node(s) {', '.join(blind)} cannot see it. Use a shared volume mounted on every node or "
            f"an s3:// / gs:// URI (checkpoints must be readable by whichever node restores them)"
        )
