"""Shared test helpers (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

from pipeline.config import Config


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
