"""Per-rank streaming of patch-pair shards, written as a list of WebDataset stages.

Equal batches per rank, spelled out (a rank that runs out first hangs DDP's all-reduce):

    rank r of R reads the shards  urls[r::R]          (disjoint; together they cover the split)
    its pass over them repeats, reshuffled per pass   (so a rank never runs dry)
    loader worker w of W reads every W-th shard of that cycle
    and yields  batches_per_epoch // W  (+1 for w < batches_per_epoch % W)  batches
    => every rank yields exactly batches_per_epoch batches of batch_size pairs per epoch.

Shard order and the pair shuffle are seeded by (seed, epoch, rank, worker), so an epoch is
reproducible and a run restarted at epoch e reads what it would have read.
Pairs stay uint8 until after batching; ``DevicePlan.prepare_batch`` converts on the device.
"""

from __future__ import annotations

import io
import logging
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


log = logging.getLogger(__name__)


class StreamError(ValueError):
    """The shards cannot feed the requested ranks / workers."""


class SkipCounter:
    """WebDataset error handler that skips a bad sample or truncated tar, counts it and warns
    once per shard (webdataset's ``warn_and_continue`` warns every time and sleeps)."""

    def __init__(self) -> None:
        self.count = 0
        self._warned: set[str] = set()

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        shard = next((str(a) for a in reversed(getattr(exn, "args", ())) if isinstance(a, str) and ".tar" in a), "?")
        if shard not in self._warned:
            self._warned.add(shard)
            log.warning("skipping bad data in shard %s (further problems in this shard are counted, not shown): %r", shard, exn)
        return True


def shards_for_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    return [reader_url(u) for u in urls[rank::world_size]]


def reader_url(url: str) -> str:
    """What webdataset opens: local paths and http(s) (curl) as they are; object stores through
    their CLIs streaming to stdout (webdataset's ``pipe:`` convention), so no SDK is needed."""
    if url.startswith("s3://"):
        return f"pipe:aws s3 cp --quiet {url} -"
    if url.startswith("gs://"):
        return f"pipe:gcloud storage cat {url}"
    return url


def check_shard_count(n_shards: int, world_size: int, loader_workers: int, split: str = "train") -> None:
    readers = world_size * max(1, loader_workers)
    if n_shards < readers:
        raise StreamError(
            f"{split} split has {n_shards} shard(s) but {world_size} rank(s) x {max(1, loader_workers)} "
            f"loader worker(s) = {readers} readers need at least one each; write more, smaller shards "
            f"(patchflow shards ... --blocks-per-shard) or lower scaling.num_workers / data.loader_workers"
        )


class _ShardCycle(IterableDataset):
    """Yields {"url": ...} over this rank's shards forever, reshuffled on every pass. A pass that
    decoded nothing (every shard this reader got is bad) raises instead of spinning forever."""

    def __init__(self, urls: list[str], seed: tuple[int, ...], progress: dict) -> None:
        self.urls, self.seed, self.progress = list(urls), seed, progress

    def __iter__(self) -> Iterator[dict]:
        rng = np.random.default_rng(self.seed)
        while True:
            blocks_before = self.progress["blocks"]
            for i in rng.permutation(len(self.urls)):
                yield {"url": self.urls[i]}
            if self.progress["blocks"] == blocks_before:
                raise StreamError(f"a full pass over {len(self.urls)} shard(s) ({self.urls[0]}, ...) yielded no readable sample")


_HEADER_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def _npy(data: bytes) -> np.ndarray:
    """.npy bytes -> array without a copy. ``np.load`` parses the header with ``ast`` and copies
    the payload every time; headers repeat (same dtype/shape per block), so parse each one once."""
    if data[:6] != b"\x93NUMPY" or data[6] != 1:  # not a v1.0 header: let numpy handle (or reject) it
        return np.load(io.BytesIO(data), allow_pickle=False)
    header_len = int.from_bytes(data[8:10], "little")
    header = data[10 : 10 + header_len]
    parsed = _HEADER_CACHE.get(header)
    if parsed is None:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(data[8 : 10 + header_len]))
        if fortran or dtype.hasobject:
            raise ValueError("expected a C-ordered numeric .npy array")
        parsed = _HEADER_CACHE[header] = (dtype, shape)
    dtype, shape = parsed
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=10 + header_len).reshape(shape)


def _decode(sample: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pairs, labels, ids = _npy(sample["pairs.npy"]), _npy(sample["labels.npy"]), _npy(sample["ids.npy"])
    k = len(pairs)
    if pairs.dtype != np.uint8 or pairs.ndim != 4 or pairs.shape[1] != 2 or labels.shape != (k,) or ids.shape != (k, 2):
        raise ValueError(
            f"sample {sample.get('__key__')!r}: expected pairs uint8 (K,2,P,P), labels (K,), ids (K,2), "
            f"got {pairs.dtype} {pairs.shape}, {labels.shape}, {ids.shape}"
        )
    return pairs, labels, ids


def decode_blocks(
    samples: Iterator[dict], on_error: SkipCounter | None = None, progress: dict | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Tar samples -> (pairs uint8 (K,2,P,P), labels uint8 (K,), ids int64 (K,2)) blocks;
    an undecodable sample goes to ``on_error`` (skipped) or raises when there is none."""
    for sample in samples:
        try:
            block = _decode(sample)
        except Exception as exn:
            if on_error is None:
                raise
            exn.args = exn.args + (str(sample.get("__url__", "?")),)
            on_error(exn)
            continue
        if progress is not None:
            progress["blocks"] += 1
        yield block


def _shuffled_batches(
    blocks: Iterator, batch_size: int, buffer_pairs: int, rng: np.random.Generator, skips: SkipCounter
) -> Iterator[dict]:
    """Pair-level shuffle buffer, vectorised per block: each incoming pair takes the slot of a
    random buffered pair, which goes out into the batch being filled. Every pair is copied twice
    (into the buffer, into its batch) whatever the buffer size. Each batch also carries how many
    samples were skipped since the previous one (this works across loader processes)."""
    buffer = buffer_ids = batch = batch_ids = None
    held = filled = reported = 0
    for pairs, _labels, ids in blocks:
        if buffer is None:
            buffer = np.empty((buffer_pairs, *pairs.shape[1:]), np.uint8)
            buffer_ids = np.empty((buffer_pairs, 2), np.int64)
        take = min(len(pairs), buffer_pairs - held)  # warm-up: fill the buffer first
        buffer[held : held + take], buffer_ids[held : held + take] = pairs[:take], ids[:take]
        held += take
        pairs, ids = pairs[take:], ids[take:]
        while len(pairs):
            if batch is None:
                batch = np.empty((batch_size, *pairs.shape[1:]), np.uint8)
                batch_ids = np.empty((batch_size, 2), np.int64)
            n = min(len(pairs), batch_size - filled)
            if 0 < n <= held:
                slots = rng.permutation(held)[:n]  # distinct slots: no pair is emitted twice or lost
                batch[filled : filled + n], batch_ids[filled : filled + n] = buffer[slots], buffer_ids[slots]
                buffer[slots], buffer_ids[slots] = pairs[:n], ids[:n]
            elif held:  # buffer smaller than the chunk: pass the chunk through in random order
                order = rng.permutation(n)
                batch[filled : filled + n], batch_ids[filled : filled + n] = pairs[:n][order], ids[:n][order]
            else:  # shuffle_buffer = 0: keep the stream's order
                batch[filled : filled + n], batch_ids[filled : filled + n] = pairs[:n], ids[:n]
            filled += n
            pairs, ids = pairs[n:], ids[n:]
            if filled == batch_size:
                skipped, reported = skips.count - reported, skips.count
                yield {"pairs": torch.from_numpy(batch), "ids": torch.from_numpy(batch_ids), "skipped": skipped}
                batch = batch_ids = None
                filled = 0


class TrainStream(IterableDataset):
    """One epoch of one rank's training batches: ``{"pairs": uint8 (B,2,P,P), "ids": int64 (B,2)}``."""

    def __init__(
        self,
        urls: list[str],
        *,
        rank: int,
        world_size: int,
        epoch: int,
        batch_size: int,
        batches_per_epoch: int,
        shuffle_buffer: int = 4096,
        seed: int = 0,
    ) -> None:
        self.rank_urls = shards_for_rank(urls, rank, world_size)
        if not self.rank_urls:
            raise StreamError(f"rank {rank} of {world_size} got no train shards (only {len(urls)} exist)")
        self.rank, self.epoch, self.seed = rank, epoch, seed
        self.batch_size, self.batches_per_epoch, self.shuffle_buffer = batch_size, batches_per_epoch, shuffle_buffer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        n_batches = self.batches_per_epoch // n_workers + (worker < self.batches_per_epoch % n_workers)
        seed = (self.seed, self.epoch, self.rank, worker)
        skips, progress = SkipCounter(), {"blocks": 0}
        pipeline = wds.DataPipeline(
            _ShardCycle(self.rank_urls, seed, progress),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=skips),
            lambda samples: decode_blocks(samples, skips, progress),
            lambda blocks: _shuffled_batches(blocks, self.batch_size, self.shuffle_buffer, np.random.default_rng(seed), skips),
        )
        for i, batch in enumerate(pipeline):
            if i == n_batches:
                return
            yield batch


def train_loader(urls: list[str], *, loader_workers: int = 0, **stream_kwargs) -> DataLoader:
    """DataLoader over a ``TrainStream``: batching happens in the stream (batch_size=None)."""
    check_shard_count(len(urls), stream_kwargs["world_size"], loader_workers)
    stream = TrainStream(urls, **stream_kwargs)
    return DataLoader(stream, batch_size=None, num_workers=loader_workers, pin_memory=torch.cuda.is_available())


def load_pairs(urls: list[str], limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a whole (eval) split in shard order: pairs uint8 (N,2,P,P), labels (N,), ids (N,2)."""
    skips = SkipCounter()
    dataset = wds.DataPipeline(
        wds.SimpleShardList([reader_url(u) for u in urls]),
        wds.tarfile_to_samples(handler=skips),
        lambda samples: decode_blocks(samples, skips),
    )
    pairs, labels, ids, n = [], [], [], 0
    for p, l, i in dataset:
        pairs.append(p), labels.append(l), ids.append(i)
        n += len(p)
        if limit is not None and n >= limit:
            break
    if not pairs:
        raise StreamError(f"no pairs could be read from {len(urls)} shard(s), first: {urls[:1]}")
    out = np.concatenate(pairs), np.concatenate(labels), np.concatenate(ids)
    return tuple(a[:limit] for a in out) if limit is not None else out
