"""Shared test helpers (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from pipeline.config import Config


# Two small photographs per split: generation in ~2 s instead of ~30 s for the default twenty.
# Tests that need the default set (tests/test_synthetic.py's seed0) leave images unset.
FEW_IMAGES = {"train": ["skimage:chelsea.png", "skimage:brick.png"],
              "eval": ["skimage:coins.png", "skimage:clock_motion.png"]}


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1. All sockets stay bound until every port is chosen:
    binding and closing one at a time lets the kernel hand out the same port twice (a CI run gave
    Ray's GCS and client server the same one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_mlflow_server(folder, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1: SQLite backend, artifacts served by the server itself
    (the way a team runs it); returns once it answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
            return proc
        except Exception:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def small_config(shards, tmp_path, tracking_uri, **sections) -> Config:
    raw = {
        "data": {"shards": str(shards), "eval_pairs": 512, "shuffle_buffer": 256},
        "train": {"epochs": 2, "batch_size": 32, "batches_per_epoch": 5, "lr": 0.05},
        "scaling": {"num_workers": 2},
        "run": {"storage_path": str(tmp_path / "runs")},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "test", "registered_model": "test-{arch}"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Config.model_validate(raw)
