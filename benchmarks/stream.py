"""Training-stream throughput: blocks of pairs vs one pair per tar sample vs a plain numpy read.

    .venv/bin/python benchmarks/stream.py [--pairs 131072] [--single-pairs 16384]

Writes the same random 32x32 pairs as (a) one pair per tar sample and (b) blocks of 256 pairs,
reads both through the real training stream (``pipeline.data.stream.TrainStream``: tar parsing,
.npy decoding, shuffle buffer, batching) to float tensors in [0, 1], and times a plain read of the
block shards' bytes with numpy + the same float conversion (the ceiling). One process, one torch
thread: the figures are per core. Targets (issue 3): blocks >= 25x one-pair, >= 500k pairs/s,
within 2x of the ceiling.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.data.shards import PairBlock, shard_paths, write_manifest, write_split
from pipeline.data.stream import TrainStream
from pipeline.device import plan_for

PATCH = 32


def write(out: Path, pairs: np.ndarray, per_sample: int, per_shard: int) -> list[str]:
    def blocks():
        for start in range(0, len(pairs), per_sample):
            p = pairs[start : start + per_sample]
            ids = np.arange(start, start + len(p), dtype=np.int64)
            yield PairBlock(p, np.ones(len(p), np.uint8), np.stack([ids, ids], 1))

    manifest = {"schema_version": 1, "source": "benchmark", "patch_size": PATCH, "pairs_per_block": per_sample,
                "generator": {}, "splits": {"train": write_split(out, "train", blocks(), per_shard, progress=False)}}
    write_manifest(out, manifest)
    return shard_paths(out, "train")


def stream_rate(urls: list[str], n_pairs: int, batch: int = 256) -> float:
    plan = plan_for(use_gpu=False)
    stream = TrainStream(urls, rank=0, world_size=1, epoch=0, batch_size=batch,
                         batches_per_epoch=n_pairs // batch, shuffle_buffer=4096, seed=0)
    t0 = time.perf_counter()
    seen = 0
    for b in stream:
        x = plan.prepare_batch(b["pairs"].reshape(-1, 1, PATCH, PATCH))
        seen += x.shape[0] // 2
    return seen / (time.perf_counter() - t0)


def ceiling_rate(urls: list[str], n_pairs: int, batch: int = 256) -> float:
    """The same bytes read with numpy and converted batch by batch (no tar, no decode, no shuffle)."""
    plan = plan_for(use_gpu=False)
    pair_bytes = 2 * PATCH * PATCH
    t0 = time.perf_counter()
    seen = 0
    for url in urls:
        raw = np.fromfile(url, dtype=np.uint8)
        usable = min(len(raw) // pair_bytes, n_pairs - seen) // batch * batch
        for start in range(0, usable, batch):
            chunk = raw[start * pair_bytes : (start + batch) * pair_bytes]
            x = plan.prepare_batch(torch.from_numpy(chunk).reshape(-1, 1, PATCH, PATCH))
            seen += x.shape[0] // 2
    return seen / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=131072, help="pairs for the block and ceiling runs")
    parser.add_argument("--single-pairs", type=int, default=16384, help="pairs for the one-pair-per-sample run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 256, (args.pairs, 2, PATCH, PATCH), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        blocks = write(Path(tmp) / "blocks", pairs, per_sample=256, per_shard=64)
        single = write(Path(tmp) / "single", pairs[: args.single_pairs], per_sample=1, per_shard=4096)
        stream_rate(blocks, 8192)  # warm-up: imports, page cache
        rates = {
            "one pair per sample (stream)": stream_rate(single, args.single_pairs),
            "blocks of 256 (stream)": stream_rate(blocks, args.pairs),
            "plain numpy read (ceiling)": ceiling_rate(blocks, args.pairs),
        }
    for name, rate in rates.items():
        print(f"{name:32s} {rate:12,.0f} pairs/s/core")
    one, blk, ceil = rates.values()
    print(f"blocks / one-pair: {blk / one:6.1f}x   (target >= 25x)")
    print(f"blocks:            {blk / 1e3:6.0f}k pairs/s (target >= 500k)")
    print(f"ceiling / blocks:  {ceil / blk:6.2f}x   (target <= 2x)")


if __name__ == "__main__":
    main()
