"""Shared test helpers (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

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
    (the way a team runs it); returns once its /health answers. (An MLflow client as the probe waited
    ~13 s per start, sleeping in its retry back-off while the server booted in ~6.)"""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no huey consumers left behind on terminate
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


@contextlib.contextmanager
def serve_folder(folder) -> Iterator[str]:
    """``folder`` served over HTTP on 127.0.0.1 (as object storage serves shards); yields the base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None  # no request lines in the test output
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


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


def checkpoint_fpr95(checkpoint_path: str, cfg: Config) -> float:
    """FPR95 of a checkpoint's model (with its PCA head) recomputed apart from the training loop, on
    the eval pairs it used and in the layout it used (the CPU plan's channels_last)."""
    import torch

    from pipeline.checkpoint import model_from_checkpoint
    from pipeline.data.shards import shard_paths
    from pipeline.data.stream import load_pairs
    from pipeline.device import plan_for
    from pipeline.evaluate import METRIC, evaluate_pairs

    model, _ = model_from_checkpoint(checkpoint_path)
    plan = plan_for(use_gpu=False)
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pairs, labels, _ = load_pairs(shard_paths(cfg.data.shards, "eval"), cfg.data.eval_pairs)
    return evaluate_pairs(model, pairs, labels, plan)[METRIC]


def untrained_state(cfg: Config) -> dict:
    """The configured model's state dict with the weights training starts from (seeded as the loop seeds)."""
    import torch

    from pipeline.checkpoint import build_model

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg).state_dict()


def save_checkpoint(folder, model, cfg: Config) -> str:
    """``model`` saved as a training checkpoint folder (epoch 0, no run id) under config ``cfg``."""
    import torch

    from pipeline.checkpoint import save_state

    folder.mkdir()
    save_state(folder, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=0, step=0,
               mlflow_run_id=None, cfg=cfg)
    return str(folder)
