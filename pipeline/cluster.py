"""Connecting to (or starting) Ray, in one place; what of Ray's output reaches the console."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
import threading
from typing import Callable, Iterator

TRIAL_SLOT = "trial_slot"  # custom resource that Tune trial drivers hold instead of a CPU


def pin_cluster_address() -> None:
    """Record this process's local cluster as the machine's current one (Ray's
    ``/tmp/ray/ray_current_cluster``), so that ``ray status`` and a ``patchflow`` started next join it;
    put the previous content back at exit. The cluster's own processes read a record of their own
    (see ``start_local_ray``): this one is overwritten by any Ray started later.
    """
    import ray
    from ray._private.utils import get_ray_address_file, read_ray_address, write_ray_address

    previous = read_ray_address()
    # a fresh machine has no /tmp/ray: our clusters keep their files in a temp dir of their own
    os.makedirs(os.path.dirname(get_ray_address_file(None)), exist_ok=True)
    write_ray_address(ray.get_runtime_context().gcs_address)

    def restore() -> None:
        # written directly: Ray's write_ray_address logs "Overwriting previous Ray address", and at
        # interpreter exit its console handler's stream may be closed already ("Logging error")
        path = get_ray_address_file(None)
        try:
            if previous:
                with open(path, "w") as f:
                    f.write(previous)
            else:
                os.remove(path)
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


# Messages the raylet pushes to every driver that say nothing about the run: the worker-pool warning
# fires on 2 CPUs whenever a sweep starts more actors (trial drivers, Train controllers, workers)
# than CPUs. raylet.out has it either way.
RAYLET_CHATTER = ("worker processes have been started on node",)
DRIVER_LOG = "patchflow-driver.log"  # Ray's Python log lines of the driver, in the session's logs folder


def quiet_ray(verbose: bool) -> None:
    """Keep Ray's own output off the console unless ``verbose``; call before Ray starts.

    Quiet: the workers' and actors' stdout and stderr (Ray Train's set-up lines, the C++ core
    workers' errors such as the Train controller's ``PreemptionWatcher ... max_restarts > 0``) stay
    in the session's log files (``log_to_driver=False`` in ``init_ray``); Ray's Python loggers in
    this process print errors only and write everything to ``<session>/logs/patchflow-driver.log``
    (``divert_ray_logs``); Tune's progress output is off (``RAY_AIR_NEW_OUTPUT=0`` with the
    Tuner's ``verbose=0``: Ray 2.60's new output engine prints its experiment box even at 0);
    the raylet's worker-pool warning is dropped (``RAYLET_CHATTER``). Verbose: all of it, with
    ``RAY_DEDUP_LOGS`` folding the same line from N workers into one."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for handler in logging.getLogger("ray").handlers:  # Ray's own console handler (the logger does not propagate)
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
    import ray._private.worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is not None and not getattr(printer, "patchflow_filtered", False):
        def filtered(data: dict, ignore_prefix: bool) -> None:
            lines = [line for line in data.get("lines", []) if not any(c in line for c in RAYLET_CHATTER)]
            if lines:
                printer({**data, "lines": lines}, ignore_prefix)

        filtered.patchflow_filtered = True
        ray_worker.print_to_stdstream = filtered  # the driver's error-listener thread looks it up by name


def divert_ray_logs() -> str | None:
    """After Ray started: Ray's Python log lines of this process (INFO and up) also go to a file in
    the session's logs folder, whose path is returned (None when the session has no local folder)."""
    log_dir = ray_log_dir()
    if log_dir is None:
        return None
    path = os.path.join(log_dir, DRIVER_LOG)
    ray_logger = logging.getLogger("ray")
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in ray_logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger.addHandler(handler)
    return path


# Ray Train's controller polls its workers every 2 s, so each run sat up to ~3 s idle after its last
# report before fit() returned, and a sweep paid it again per trial.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.3"
# Every fit also starts a PreemptionWatcher actor (its own process, ~2 CPU-s of a 2-step 2-worker
# fit's ~34) that polls for node drains: spot nodes being reclaimed, which a local cluster never has.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
LOCAL_CLUSTER_ENV = {HEALTH_CHECK_ENV: HEALTH_CHECK_INTERVAL_S, PREEMPTION_WATCHER_ENV: "0"}


def start_local_ray(num_cpus: int, cluster_env: dict[str, str] | None = None, **init_kwargs) -> None:
    """Start a local Ray with ``num_cpus`` CPUs and one trial slot per CPU, whose processes have
    ``LOCAL_CLUSTER_ENV`` (unless the user set a variable): Train workers polled every
    ``HEALTH_CHECK_INTERVAL_S`` seconds, no preemption watcher; plus ``cluster_env``, given the same way.

    The cluster's processes inherit the settings from this process's environment at start; the
    driver then drops them again, because Ray Train forwards such variables it finds set in the
    driver as a ``runtime_env``, and a runtime_env makes every Train actor start a fresh worker
    process (through Ray's setup_worker) instead of taking an idle one: a 4-step 1-worker fit took
    17.0 s with the variable in the driver and 14.5 s without (benchmarks/README, "The suite").

    The cluster also gets a Ray temp dir of its own (``$RAY_TMPDIR``, inherited the same way) that
    records it as the current cluster. Train's PlacementGroupCleaner and other State API users
    inside the cluster find their cluster by that record, and the machine-wide one
    (``/tmp/ray/ray_current_cluster``) belongs to whichever Ray started last. When a second Ray on
    the machine (a test session, another ``patchflow train``, a ``ray start``) took it over, the
    cleaner asked that cluster about our Train controller and was told that no such actor existed.
    It then removed the run's placement group and killed the training mid-epoch; this happened to a
    zoo run on 2026-12-01. The machine-wide record still names this cluster (``pin_cluster_address``),
    so ``ray status`` and a second ``patchflow`` on the machine find it.
    """
    import ray
    from ray._private.utils import write_ray_address

    # short: Ray's socket paths under it have a length limit
    own_tmp = tempfile.mkdtemp(prefix="pf-ray-", dir=os.environ.get("RAY_TMPDIR") or "/tmp")
    ours = {k: v for k, v in {**LOCAL_CLUSTER_ENV, **(cluster_env or {})}.items() if k not in os.environ}
    saved_tmp = os.environ.get("RAY_TMPDIR")
    os.environ.update({**ours, "RAY_TMPDIR": own_tmp})
    try:
        ray.init(address="local", num_cpus=num_cpus, resources={TRIAL_SLOT: num_cpus}, **init_kwargs)
    finally:
        for key in ours:
            del os.environ[key]
        if saved_tmp is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = saved_tmp
    write_ray_address(ray.get_runtime_context().gcs_address, os.path.join(own_tmp, "ray"))
    pin_cluster_address()


def init_ray(address: str | None = None, *, verbose: bool = True) -> None:
    """Join ``address`` / $RAY_ADDRESS / a running ``ray start`` cluster; otherwise start a local
    Ray with this machine's CPUs and one trial slot per CPU (see ``pipeline.tune`` for why).
    ``verbose=False`` keeps the workers' output in Ray's log files (``quiet_ray``)."""
    import ray

    if ray.is_initialized():
        return
    quiet_ray(verbose)
    address = address or os.environ.get("RAY_ADDRESS") or _running_cluster()
    if address:
        ray.init(address=address, log_to_driver=verbose)  # a joined cluster keeps its own settings
    else:
        start_local_ray(os.cpu_count() or 1, include_dashboard=True, log_to_driver=verbose)
    if not verbose:
        divert_ray_logs()


def ray_log_dir() -> str | None:
    """Where this session's Ray processes write their logs (None before Ray starts)."""
    import ray

    try:
        path = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:  # a Ray Client connection: the logs are on the cluster's nodes (``ray logs``)
        return None
    return path if os.path.isdir(path) else None


@contextlib.contextmanager
def line_relay(say: Callable[[str], None], poll_s: float = 0.5) -> Iterator[object]:
    """Lines produced in other Ray processes, printed here: yields a handle whose ``add.remote(line)``
    queues a line (a Ray Train callback runs in the Train controller actor, whose stdout only
    reaches this console with ``log_to_driver``). A thread prints what arrived every ``poll_s``; the
    rest is printed on exit."""
    import ray

    @ray.remote(num_cpus=0)
    class Lines:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def add(self, line: str) -> None:
            self.lines.append(line)

        def take(self) -> list[str]:
            out, self.lines = self.lines, []
            return out

    handle = Lines.remote()
    stop = threading.Event()

    def pump() -> None:
        while not stop.wait(poll_s):
            for line in ray.get(handle.take.remote()):
                say(line)

    thread = threading.Thread(target=pump, name="patchflow-progress", daemon=True)
    thread.start()
    try:
        yield handle
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(ray.exceptions.RayError):  # Ray went down with the run: no lines left to show
            for line in ray.get(handle.take.remote()):
                say(line)
            ray.kill(handle)


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
