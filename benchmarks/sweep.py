"""ASHA vs running every trial to the end: the same search, side by side, in one run.

    .venv/bin/python benchmarks/sweep.py [--shards shards] [--trials 8] [--epochs 4]

Both sweeps use the same seeded grid (margin x lr) on the same shards; the script prints each
one's wall time, the ratio, and whether both picked the same best configuration.
Target (issue 5): ASHA <= 0.5x the full run's wall time with the same best configuration.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline.cluster import init_ray
from pipeline.config import Config
from pipeline.tune import run_sweep


def sweep_config(shards: str, tmp: Path, scheduler: str, epochs: int) -> Config:
    return Config.model_validate({
        "data": {"shards": str(Path(shards).resolve()), "eval_pairs": 2000},
        "train": {"epochs": epochs, "batch_size": 64, "batches_per_epoch": 20},
        "run": {"storage_path": str(tmp / scheduler / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / scheduler / 'mlflow.db'}", "experiment": f"bench-{scheduler}"},
        "sweep": {
            "num_samples": 1, "workers_per_trial": 1, "scheduler": scheduler, "grace_period": 1, "reduction_factor": 2,
            "search_space": {"loss.margin": {"grid": [0.25, 0.5, 1.0, 2.0]}, "train.lr": {"grid": [0.01, 0.1]}},
        },
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="shards", help="made by `patchflow shards synthetic --out shards`")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    init_ray()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheduler in ("asha", "fifo"):
            (Path(tmp) / scheduler).mkdir()
            t0 = time.perf_counter()
            result = run_sweep(sweep_config(args.shards, Path(tmp), scheduler, args.epochs))
            results[scheduler] = (time.perf_counter() - t0, result.best)
    (t_asha, best_asha), (t_full, best_full) = results["asha"], results["fifo"]
    print(f"ASHA: {t_asha:7.1f} s  best {best_asha.params} FPR95 {best_asha.best_fpr95:.4f}")
    print(f"full: {t_full:7.1f} s  best {best_full.params} FPR95 {best_full.best_fpr95:.4f}")
    print(f"ASHA / full wall time: {t_asha / t_full:.2f}x (target <= 0.5x); "
          f"same best config: {best_asha.params == best_full.params}")


if __name__ == "__main__":
    main()
