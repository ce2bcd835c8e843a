"""Connecting to (or starting) Ray, in one place."""

from __future__ import annotations

import os

TRIAL_SLOT = "trial_slot"  # custom resource that Tune trial drivers hold instead of a CPU


def init_ray(address: str | None = None) -> None:
    """Join ``address`` / $RAY_ADDRESS when given; otherwise start a local Ray with this
    machine's CPUs and one trial slot per CPU (see ``pipeline.tune`` for why)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, resources={TRIAL_SLOT: cpus}, include_dashboard=True, log_to_driver=True)
